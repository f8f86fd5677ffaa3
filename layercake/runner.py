"""The Runner: ``forward(tokens, positions, cache) -> logits``, the one interface that
``generate`` and everything above it sees. ``LocalRunner`` runs resident slices on one device."""

from __future__ import annotations

from collections import Counter
from typing import Protocol

import torch

from layercake.config import BaseConfig
from layercake.kv_cache import AttentionStep, KVCache
from layercake.models.base import DecoderSlice
from layercake.progress import on_new_shape
from layercake.quant import QuantSpec


class Runner(Protocol):
    vocab_size: int
    max_context: int
    device: torch.device

    def new_cache(self, batch: int, capacity: int) -> KVCache: ...

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        token_mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor: ...


class LocalRunner:
    """Chains resident slices (together the whole model) on one device."""

    def __init__(
        self,
        slices: list[DecoderSlice],
        config: BaseConfig,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        cache_quant: QuantSpec | None = None,
        compile_step: bool = False,
    ) -> None:
        """``cache_quant``: the KV cache is held quantized so (``Compression.cache_spec``).
        ``compile_step``: one-token steps of up to ``MAX_STATIC_BATCH`` rows run as one
        compiled graph of the same forward, with static shapes (caches are made with their
        capacity rounded up to ``CAPACITY_STEP`` slots; attention masks the unwritten ones)."""
        self.slices = slices
        self.cache_quant = cache_quant
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        self.vocab_size = config.vocab_size
        self.max_context = config.max_position_embeddings
        self.layers = sorted(i for s in slices for i in s.parts.layers)
        # (start, slice, span): each held range runs in model order, even across slices
        segments = []
        for s in slices:
            ranges = s.parts.ranges()
            if not ranges:  # embeddings-only or head-only slice
                segments.append((-1 if s.parts.embed else config.num_hidden_layers, s, None))
            segments += [(a, s, (a, b)) for a, b in ranges]
        self.segments = sorted(segments, key=lambda seg: seg[0])
        self._step = None
        if compile_step:
            opts = {"cpp_wrapper": True} if self.device.type == "cpu" else {}
            self._step = torch.compile(self._run, fullgraph=True, dynamic=False, options=opts,
                                       recompile_limit=MAX_GRAPHS)  # fmt: skip
            what = "compiling the one-token step for {key[0]} rows (torch.compile, once per shape)"
            self._step = on_new_shape(self._step, lambda a: (len(a[0]), a[2].capacity), what)

    def describe(self) -> str:
        """Which path runs, and why (``-v``, the chat page): device, dtype, the forms of the
        linear weights (``ops.linear``), the KV cache's form and whether steps compile."""
        from layercake.ops.linear import bf16_kernel, forms

        counts = sum((forms(s) for s in self.slices), Counter())
        held = ", ".join(f"{f} x{n}" for f, n in counts.most_common())
        why = [WHY[f].format(bf16=bf16_kernel() if f == "bf16" else "") for f in counts if f in WHY]
        words = [f"in memory, {self.device.type}, {str(self.dtype).removeprefix('torch.')}"]
        words.append(f"linears: {held}" + (f" ({'; '.join(why)})" if why else ""))
        if self.cache_quant is not None:
            words.append(f"KV cache {self.cache_quant}")
        if self._step is not None:
            words.append(f"one-token steps of <= {MAX_STATIC_BATCH} rows compiled")
        return "; ".join(words)

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        c = self.config
        if self._step is not None and batch <= MAX_STATIC_BATCH:
            capacity = min(-(-capacity // CAPACITY_STEP) * CAPACITY_STEP, self.max_context)
        return KVCache.allocate(
            self.layers,
            batch,
            capacity,
            c.num_key_value_heads,
            c.head_dim,
            self.dtype,
            self.device,
            window=getattr(c, "sliding_window", None),
            quant=self.cache_quant,
        )

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,  # (B, T)
        positions: torch.Tensor,  # (B, T)
        cache: KVCache,
        token_mask: torch.Tensor | None = None,  # (B, T) False = padding
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T or 1, vocab) in fp32; appends the T tokens to ``cache``."""
        tokens, positions = tokens.to(self.device), positions.to(self.device)
        if token_mask is None:
            token_mask = torch.ones(positions.shape, dtype=torch.bool)
        token_mask = token_mask.to(self.device)
        if self._static(positions, cache):
            step = static_step(cache, token_mask)
            x = self._step(tokens, positions, cache, step)
            cache.length += 1
            return x.float()
        step = cache.begin(token_mask)
        x = self._run(tokens, positions, cache, step, last_only)
        cache.advance(step)
        return x.float()

    def _run(self, x, positions, cache, step, last_only: bool = False) -> torch.Tensor:  # noqa: ANN001
        for _, s, span in self.segments:
            x = s(x, positions, cache, step, last_only, span)
        return x

    def _static(self, positions: torch.Tensor, cache: KVCache) -> bool:
        """Whether this step runs the compiled graph: one token, few rows, a plain cache."""
        B, T = positions.shape
        first = next(iter(cache.keys.values()), None)
        return (
            self._step is not None
            and T == 1
            and B <= MAX_STATIC_BATCH
            and isinstance(first, torch.Tensor)
            and cache.length < cache.capacity
        )


WHY = {
    "blocks": "GGUF/int blocks on our kernel, int8 activations as llama.cpp; --exact for fp32",
    "bf16": "bf16 weights multiplied as stored ({bf16}); --exact converts them to fp32",
    "int4pack": "int4 on PyTorch's kernel",
    "dequant": "dequantized block by block before each use",
}
MAX_STATIC_BATCH = 8  # compiled one-token steps: each batch size up to this is one graph
CAPACITY_STEP = 256  # compiled steps: cache capacities are rounded up to this (fewer graphs)
# graphs one compiled step may hold (one per rows x capacity: an engine's row buckets at its two
# cache sizes, generate's batches); past torch.compile's default of 8 it would run eagerly
MAX_GRAPHS = 64


def static_step(cache: KVCache, token_mask: torch.Tensor) -> AttentionStep:
    """A one-token step over the whole capacity (static shapes): the slot written as a tensor,
    the mask over every slot (the unwritten ones, and those outside a sliding window, off)."""
    s, cap = cache.length, cache.capacity
    cache.valid[:, s] = token_mask[:, 0]
    idx = torch.arange(cap, device=cache.valid.device)
    seen = cache.valid & (idx <= s)
    if cache.window is not None:
        seen &= s - idx < cache.window
    mask = (seen | (idx == s)).view(-1, 1, 1, cap)
    slot = torch.full((1,), s, dtype=torch.long, device=cache.valid.device)
    return AttentionStep(0, 0, mask, slot)

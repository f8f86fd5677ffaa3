"""The Runner: ``forward(tokens, positions, cache) -> logits``, the one interface that
``generate`` and everything above it sees. ``LocalRunner`` runs resident slices on one device."""

from __future__ import annotations

from typing import Protocol

import torch

from layercake.config import BaseConfig
from layercake.kv_cache import KVCache
from layercake.models.base import DecoderSlice
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
    ) -> None:
        """``cache_quant``: the KV cache is held quantized so (``Compression.cache_spec``)."""
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

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        c = self.config
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
        step = cache.begin(token_mask.to(self.device))
        x = tokens
        for _, s, span in self.segments:
            x = s(x, positions, cache, step, last_only, span)
        cache.advance(step)
        return x.float()

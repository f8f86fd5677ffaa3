"""The engine's options: one dataclass, built once by the CLI (``Options.from_args``) and by
``layercake.load(model, **kw)`` (``Options.of``), checked once here, read by the runner
factory (``layercake.runners``)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields, replace
from functools import cached_property
from typing import Any

import torch

from layercake.devices import parse_device, parse_dtype
from layercake.errors import LayercakeError
from layercake.quant import Compression, compression

POLICIES = (None, "auto", "budget")


@dataclass(frozen=True)
class Options:
    """How to run a model: which part, where, placed how, compressed how.

    ``parts`` the part spec; ``device`` cpu/cuda/mps; ``dtype`` the compute dtype (fp32 on CPU
    by default); ``threads`` torch CPU threads; ``compile``: one-token steps of up to 8 rows run
    as one compiled graph of the model's forward (static cache capacity; the first steps of each
    batch size compile it: tens of seconds).

    Offloading (any of ``percent``, ``device_memory``, ``cpu_memory``): weights, KV cache and
    activations are placed over device, host RAM and ``offload_dir`` by FlexGen's six
    percentages ``(W_DEV, W_CPU, KV_DEV, KV_CPU, ACT_DEV, ACT_CPU)`` (disk gets the rest) or by
    byte budgets ("1.6GB", "800MiB"); each loaded layer serves ``num_batches`` micro-batches of
    ``batch_size`` sequences (a block) before the next; ``max_context`` is the prompt +
    generation length budgets plan the KV cache for; ``pass_tokens`` the most tokens per sequence
    one forward pass brings (default ``max_context``; a pipeline stage's prompt chunks are
    shorter), which budgets plan the activations for. ``cpu_cache_compute`` (CUDA): attention of
    the layers whose KV cache is in host RAM or on disk runs on the CPU (FlexGen's option).

    Pipeline (``topology``, a topology file): this process is the topology's first node and
    holds its layers; ``layercake worker`` runs the others' (each with its own device and
    budgets from the file); ``micro_batches`` overrides the file's split of a batch's rows.

    Compression: ``compress_weight`` holds linear weights quantized in every tier (device, host
    RAM, disk): on the CPU int4 ones multiply packed on PyTorch's int4 kernel, the output head
    is held int8 per row, others are dequantized just before use; ``compress_cache`` holds the
    KV cache quantized. ``compress_bits`` 4 (default) or 8, ``group_size`` values per
    scale/zero (default 32, along the input dimension; the cache's groups are head_dim when
    narrower). With ``gguf_native`` GGUF Q4_0 / Q4_1 / Q8_0 weights keep their own form (group
    32) instead of being re-quantized. Combines with any part spec, offloading policy and
    device; not with ``compile`` or (yet) ``topology``.

    ``policy="auto"`` (with budgets, without ``percent``): the planner measures this machine
    (cached), times the model's layers and picks batch size, micro-batches, placement (and, with
    ``allow_compression``, int4 weights) for the highest predicted throughput within the budgets,
    for up to ``max_sequences`` sequences of ``max_context`` tokens, ``prompt_len`` of them
    prompt (default half); a given ``batch_size`` / ``num_batches`` is kept.

    Fast by default (CPU, fp32 compute, in memory): GGUF Q4_0 / Q4_1 / Q8_0 weights are kept
    bit for bit as blocks for our kernel (``ops.blocks``; activations rounded to int8 per
    block of 32, as llama.cpp does) and bf16 weights are multiplied as stored (exact);
    ``exact`` turns that off (fp32 weights, fp32 activations). ``packed``: float models too
    on the block kernels, their weights held as with ``compress_weight`` (int4, lossy); in
    memory only.
    """

    parts: str = "f"
    device: str | torch.device = "cpu"
    dtype: str | torch.dtype | None = None
    threads: int | None = None
    compile: bool = False
    percent: tuple[float, ...] | list[float] | None = None
    device_memory: str | int | None = None
    cpu_memory: str | int | None = None
    offload_dir: str | os.PathLike | None = None
    batch_size: int | None = None
    num_batches: int | None = None
    max_context: int | None = None
    pass_tokens: int | None = None
    cpu_cache_compute: bool = False
    topology: str | os.PathLike | None = None
    micro_batches: int | None = None
    compress_weight: bool = False
    compress_cache: bool = False
    compress_bits: int | None = None
    group_size: int | None = None
    gguf_native: bool = True
    policy: str | None = None
    allow_compression: bool = False
    max_sequences: int | None = None
    prompt_len: int | None = None
    packed: bool = False
    exact: bool = False

    def __post_init__(self) -> None:
        if self.packed and (self.topology is not None or self.offloaded):
            raise LayercakeError(
                "--packed is for in-memory models: not with offloading or --topology"
            )
        comp = self.compression  # checks bits and group size
        if self.policy not in POLICIES:
            raise LayercakeError(f"unknown policy {self.policy!r}: use auto or budget")
        if self.policy == "auto" and self.percent is not None:
            raise LayercakeError("--policy auto plans the placement: give budgets, not --percent")
        if comp is not None and comp.weight is not None and self.compile and not self.packed:
            raise LayercakeError(
                "--compile does not combine with --compress-weight (compiled layers need plain "
                "weights); use one or the other"
            )
        if comp is not None and self.topology is not None:
            raise LayercakeError(
                "--compress-weight / --compress-cache do not combine with --topology yet"
            )

    @classmethod
    def of(cls, **kw: Any) -> Options:
        """Options from keyword arguments (``load``'s); an unknown name is a clear error."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(kw) - set(known))
        if unknown:
            raise LayercakeError(
                f"unknown option {', '.join(map(repr, unknown))}; options are: {', '.join(known)}"
            )
        return cls(**kw)

    @classmethod
    def from_args(cls, a: argparse.Namespace, **kw: Any) -> Options:
        """The engine options a command line parsed (``cli_options.add_engine_options``);
        ``kw`` sets those a command decides itself (``max_sequences``)."""
        given = {f.name: getattr(a, f.name) for f in fields(cls) if hasattr(a, f.name)}
        return cls.of(**{**given, **kw})

    @cached_property
    def compression(self) -> Compression | None:
        """What is held compressed (``packed`` holds weights as ``compress_weight`` does)."""
        return compression(
            self.compress_weight or self.packed,
            self.compress_cache,
            self.compress_bits,
            self.group_size,
            self.gguf_native,
        )

    def with_compression(self, c: Compression | None) -> Options:
        """These options holding what ``c`` holds compressed (a plan's or a probe's choice)."""
        spec = (c.weight or c.cache) if c is not None else None
        return replace(
            self,
            compress_weight=c is not None and c.weight is not None,
            compress_cache=c is not None and c.cache is not None,
            compress_bits=spec.bits if spec else None,
            group_size=spec.group_size if spec else None,
            gguf_native=c.gguf_native if c is not None else self.gguf_native,
            packed=False,
        )

    @property
    def offloaded(self) -> bool:
        """Whether a placement is given: percentages or a memory budget."""
        return any(v is not None for v in (self.percent, self.device_memory, self.cpu_memory))

    @cached_property
    def torch_device(self) -> torch.device:
        return parse_device(self.device)

    @cached_property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype, self.torch_device)

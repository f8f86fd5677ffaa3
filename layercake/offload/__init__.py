"""Offloading: run a model larger than memory under a placement policy (see ``policy``)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from layercake.checkpoint.parts import Parts
from layercake.config import BaseConfig
from layercake.errors import LayercakeError
from layercake.offload.executor import OffloadRunner
from layercake.offload.kvdisk import RING
from layercake.offload.policy import Footprint, Policy, parse_bytes, plan_policy
from layercake.quant import Compression
from layercake.runner import LocalRunner

SAFETY = 96 * 2**20  # allocator slack, thread stacks, the tokenizer's growth: kept free

__all__ = ["OffloadRunner", "Policy", "offload_runner", "parse_bytes"]


def offload_runner(
    ckpt: Any,
    config: BaseConfig,
    source: Path,
    parts: Parts,
    device: torch.device,
    dtype: torch.dtype,
    percent: tuple[float, ...] | list[float] | None = None,
    cpu_memory: str | int | None = None,
    device_memory: str | int | None = None,
    offload_dir: str | Path | None = None,
    batch_size: int | None = None,
    num_batches: int | None = None,
    max_context: int | None = None,
    compress: Compression | None = None,
    cpu_cache_compute: bool = False,
) -> OffloadRunner | LocalRunner:
    """An ``OffloadRunner`` placed by ``percent`` (FlexGen's six numbers) or, without it, by
    byte budgets planned for blocks of ``batch_size x num_batches`` sequences of up to
    ``max_context`` tokens (longer ones put the cache of the layers that do not fit on disk).
    ``compress``: weights and/or KV cache held quantized in every tier (budgets count their
    compressed bytes). ``cpu_cache_compute`` (CUDA): attention of layers whose cache is in host
    RAM or on disk runs on the CPU, where the cache is (FlexGen's ``--cpu-cache-compute``)."""
    if cpu_cache_compute and device.type != "cuda":
        raise LayercakeError("--cpu-cache-compute needs --device cuda (on CPU it already is)")
    kw = {"batch_size": batch_size or 32, "num_batches": num_batches or 1}
    directory = Path(offload_dir).expanduser() if offload_dir is not None else None
    cpu_b, dev_b = parse_bytes(cpu_memory), parse_bytes(device_memory)
    if percent is not None:
        policy = Policy.from_percent(percent, **kw)
        runner = OffloadRunner(ckpt, config, source, parts, policy, device, dtype, directory,
                               compress=compress, cpu_cache_compute=cpu_cache_compute)  # fmt: skip
    else:
        if cpu_b is None and dev_b is None:
            raise LayercakeError("offloading needs --percent or a memory budget")
        fp = footprint(ckpt, config, parts, dtype, **kw, context=max_context or 256,
                       compress=compress, packed=device.type == "cpu")  # fmt: skip
        if cpu_b is not None:  # a budget for the whole process: what it holds already counts
            cpu_b -= process_rss() + SAFETY
        policy = plan_policy(fp, cpu_b, dev_b, device.type == "cuda", **kw)
        if policy.cache_disk > 0:  # the ring that holds disk layers' cache rows in RAM
            ring = RING * fp.kv // max(1, len(parts.layers))
            fp = replace(fp, activations=fp.activations + ring)
            policy = plan_policy(fp, cpu_b, dev_b, device.type == "cuda", **kw)
        if policy.w_device == 100 and policy.cache_device == 100 and device.type == "cpu":
            return resident_runner(ckpt, config, parts, device, dtype, policy, compress)
        # bytes of cache on the compute device (host RAM on CPU); on CUDA the policy's host
        # share goes to pinned RAM, the rest to disk
        kv_budget = int(fp.kv * policy.cache_device / 100)
        runner = OffloadRunner(
            ckpt, config, source, parts, policy, device, dtype, directory, kv_budget, compress,
            cpu_cache_compute,
        )  # fmt: skip
    return runner


def resident_runner(
    ckpt: Any, config: BaseConfig, parts: Parts, device: torch.device, dtype: torch.dtype,
    policy: Policy, compress: Compression | None = None,
) -> LocalRunner:  # fmt: skip
    """Everything fits the budget: the in-memory runner (packed or compressed weights), in
    blocks."""
    from layercake.models.build import build_slice

    model = build_slice(ckpt, parts, device, dtype, config, compress=compress)
    cache_quant = compress.cache_spec(config.head_dim) if compress else None
    runner = LocalRunner([model], config, device, dtype, cache_quant)
    runner.block_size, runner.policy = policy.block_size, policy
    return runner


def footprint(
    ckpt: Any,
    config: BaseConfig,
    parts: Parts,
    dtype: torch.dtype,
    batch_size: int,
    num_batches: int,
    context: int,
    compress: Compression | None = None,
    packed: bool = False,
) -> Footprint:
    """Sizes of the streamed units and of one block's cache and activations. Compressed
    weights are held compressed in every tier, the device's included (ratio 1); each unit is
    dequantized into a compute-dtype scratch, or (``packed``, the int4 CPU kernel's form) has
    its scales transposed and its values gathered from two tiers into a byte scratch."""
    block = batch_size * num_batches
    units = streamed_units(ckpt, config, parts, dtype, compress, packed)[1]
    weights = sum(u.nbytes for u in units)
    itemsize = units[0].entries[0].torch_dtype.itemsize
    scratch = max(
        sum(e.nbytes if e.form else e.numel * dtype.itemsize for e in u.entries) for u in units
    )
    compressed = compress is not None and compress.weight is not None
    direct = direct_bf16(units, dtype, compress)  # then only vectors (norms, biases) convert
    direct_scratch = max(
        sum(e.numel * dtype.itemsize for e in u.entries if len(e.shape) == 1) for u in units
    )
    widest = (
        max(e.shape[0] for u in units for e in u.entries if u.kind == "layer")
        if any(u.kind == "layer" for u in units)
        else config.hidden_size
    )
    micro = batch_size * context  # intermediates: one micro-batch at a time
    act = 4 * (micro * 2 * widest + block * context * 2 * config.hidden_size)
    act += 4 * block * config.vocab_size  # the logits of a step
    per_value = float(dtype.itemsize)
    if compress is not None and compress.cache is not None:
        spec = compress.cache_spec(config.head_dim)
        per_value = spec.row_bytes(config.head_dim) / config.head_dim
        # the two dequantized work buffers of one layer (shared by every layer)
        act += 2 * dtype.itemsize * block * context * config.num_key_value_heads * config.head_dim
    kv = 2 * per_value * block * context * len(parts.layers) * config.num_key_value_heads
    kv = int(kv * config.head_dim)
    return Footprint(
        weights=weights,
        compute_ratio=1.0 if compressed else dtype.itemsize / itemsize,
        scratch=scratch if compressed else direct_scratch if direct else 0,
        direct=direct,
        max_unit=max(u.nbytes for u in units),
        activations=act,
        kv=kv,
    )


def direct_bf16(units: list, dtype: torch.dtype, compress: Compression | None) -> bool:
    """Whether streamed bf16 weights multiply as stored (fp32 compute on the CPU, our kernel)."""
    from layercake.ops import kernels

    return (
        (compress is None or compress.weight is None)
        and dtype == torch.float32
        and all(e.torch_dtype == torch.bfloat16 for u in units for e in u.entries)
        and kernels.available()
    )


def streamed_units(
    ckpt: Any, config: BaseConfig, parts: Parts, dtype: torch.dtype,
    compress: Compression | None, packed: bool = False,
) -> tuple[torch.nn.Module, list]:  # fmt: skip
    """The slice's model on the meta device and its streamed units (``store.plan_units``;
    ``packed``: CPU compute, int4 weights in the kernel's form)."""
    from layercake.models import family
    from layercake.offload.store import plan_units

    fam = family(config.model_type)
    with torch.device("meta"):
        model = fam.Model(config, parts)
    packed = packed and dtype == torch.float32
    units = plan_units(
        ckpt, model, parts.layers, parts.head, fam.Model.tied, dtype, compress, packed
    )
    if not units:
        raise LayercakeError(f"part {parts} has no layers or head to offload")
    return model, units


def process_rss() -> int:
    """Resident bytes of this process now (0 where /proc is missing)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    import mmap

    return pages * mmap.PAGESIZE

"""Memory accounting of offloading: the bytes of the streamed units, of a block's KV cache and
activations, of the resident tensors outside the units, and of the process itself. The budget
planner (``policy``), the cost model (``planner``), ``auto`` and the runner factory read every
memory figure from here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from layercake.config import BaseConfig
from layercake.errors import LayercakeError
from layercake.models.parts import Parts
from layercake.offload.policy import Footprint
from layercake.quant import Compression

SAFETY = 96 * 2**20  # allocator slack, thread stacks, the tokenizer's growth: kept free


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


def held_bytes() -> int:
    """Host bytes a whole-process budget has spent already: this process now, and ``SAFETY``."""
    return process_rss() + SAFETY


def process_rss() -> int:
    """Resident bytes of this process now (0 where /proc is missing)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    import mmap

    return pages * mmap.PAGESIZE

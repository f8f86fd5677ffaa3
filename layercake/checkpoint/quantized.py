"""Linear weights read from a checkpoint straight into the quantized row layout (``quant``).

GGUF Q4_0 / Q4_1 / Q8_0 tensors keep their own form (group 32, bytes moved, never expanded);
everything else is quantized from its stored float values, in blocks, so the fp32 transient is
bounded whatever the tensor's size (a tied 128k-vocabulary head included).
"""

from __future__ import annotations

from typing import Any

import torch

from layercake.quant import GGUF_BLOCKS, Compression, QuantSpec, from_gguf, quantize_rows


def native_block(ckpt: Any, src: str, compress: Compression) -> str | None:
    """The GGUF block type kept as it is, or None (quantized from float values)."""
    if not compress.gguf_native or not hasattr(ckpt, "block_type"):
        return None
    kind = ckpt.block_type(src)
    return kind if kind in GGUF_BLOCKS else None


def weight_spec(ckpt: Any, src: str, compress: Compression, width: int) -> QuantSpec:
    """How tensor ``src`` (rows of ``width`` values) is held compressed."""
    kind = native_block(ckpt, src, compress)
    if kind is not None:
        return QuantSpec(GGUF_BLOCKS[kind][0], 32)
    compress.weight.check(width, f"tensor {src!r}")
    return compress.weight


def load_rows(
    ckpt: Any, src: str, compress: Compression, row0: int = 0, n: int | None = None
) -> torch.Tensor:
    """Rows [row0, row0 + n) of tensor ``src`` in the row layout of its ``weight_spec``."""
    kind = native_block(ckpt, src, compress)
    if kind is not None:
        rows, _ = from_gguf(ckpt.load_blocks(src), kind)
        part = rows[row0 : None if n is None else row0 + n]
        return part.clone() if part.shape[0] < rows.shape[0] else part  # not the whole held
    t = ckpt.load(src, ckpt.stored_dtype(src) or torch.float32)
    return quantize_rows(t[row0 : None if n is None else row0 + n], compress.weight)

"""Linear weights read from a checkpoint straight into the quantized row layout (``quant``).

A weight's form is named by a string: ``int4-g64`` (quantized from its stored float values, in
blocks, so the fp32 transient is bounded whatever the tensor's size, a tied 128k-vocabulary head
included) or a GGUF block type ``Q4_0`` / ``Q4_1`` / ``Q8_0``, kept as it is (group 32, bytes
moved, never expanded).
"""

from __future__ import annotations

from typing import Any

import torch

from layercake.quant import GGUF_BLOCKS, Compression, QuantSpec, from_gguf, quantize_rows


def weight_quant(ckpt: Any, src: str, compress: Compression, width: int, head: bool = False) -> str:
    """The form tensor ``src`` (rows of ``width`` values; ``head``: the output head's) is held
    in."""
    if compress.gguf_native and hasattr(ckpt, "block_type"):
        kind = ckpt.block_type(src)
        if kind in GGUF_BLOCKS:
            return kind
    spec = compress.head_spec(width) if head else compress.weight
    spec.check(width, f"tensor {src!r}")
    return str(spec)


def quant_spec(quant: str) -> QuantSpec:
    """``int4-g64`` or a GGUF block type -> its ``QuantSpec``."""
    if quant in GGUF_BLOCKS:
        return QuantSpec(GGUF_BLOCKS[quant][0], 32)
    bits, group = quant.removeprefix("int").split("-g")
    return QuantSpec(int(bits), int(group))


def load_rows(ckpt: Any, src: str, quant: str, row0: int = 0, n: int | None = None) -> torch.Tensor:
    """Rows [row0, row0 + n) of tensor ``src`` in the row layout of ``quant``."""
    end = None if n is None else row0 + n
    if quant in GGUF_BLOCKS:
        rows, _ = from_gguf(ckpt.load_blocks(src), quant)
        part = rows[row0:end]
        return part.clone() if part.shape[0] < rows.shape[0] else part  # not the whole held
    t = ckpt.load(src, ckpt.stored_dtype(src) or torch.float32)
    return quantize_rows(t[row0:end], quant_spec(quant))

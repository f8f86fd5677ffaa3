"""Group-32 int4/int8 weights as GGUF-style blocks, multiplied by our own AVX2 kernel.

PyTorch's ``_weight_int4pack_mm_for_cpu`` unpacks to floats, so for one row of activations it
moves packed weights far slower than memory delivers them: single-stream decode is bound by that
kernel, not by memory. ``block_mm`` (``csrc/kernels.cpp``) does what llama.cpp
does instead: the activations are quantized per block of 32 to int8 and each block's dot
product runs on integer multiply-adds, on weights held as blocks of (fp16 scale, fp16 offset,
32 values). A 4-bit block has exactly GGUF Q4_1's fields, so a Q4_1 model keeps its weights
bit for bit; Q4_0 and our own int4 groups of 32 map onto it too, and 8-bit groups (GGUF Q8_0,
output heads) have their own 36-byte block. It outruns PyTorch's int4 kernel at one row of
activations and from 32 rows on (the README's "Fast CPU decoding" has the figures).

The activations' int8 rounding adds more error to a product than PyTorch's kernel's bf16
rounding (README); ``benchmarks/quality.py`` measures the perplexity it costs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from layercake.ops import kernels
from layercake.quant import SCALE_DTYPE, QTensor, QuantSpec

GROUP = 32
BLOCK_BYTES = {4: 20, 8: 36}


def takes(shape: tuple[int, ...], spec: QuantSpec, device: torch.device | str = "cpu") -> bool:
    """Whether a weight (out, in) quantized by ``spec`` can be held as blocks here: int4 in
    groups of 32, or int8 in groups of any multiple of 32 (one per row included)."""
    return (
        torch.device(device).type == "cpu"
        and len(shape) == 2
        and shape[1] % GROUP == 0
        and spec.group_size % GROUP == 0
        and (spec.bits == 8 or spec.group_size == GROUP)
        and spec.bits in BLOCK_BYTES
        and kernels.available()
    )


def to_blocks(q: QTensor) -> torch.Tensor:
    """A 2-D QTensor (``zero + scale * q``; see ``takes``) -> blocks (N, K / 32 * 20|36): each
    row its K / 32 fp16 scales, its fp16 offsets, then its values. 4 bits: the values are moved
    as they are (the QTensor's nibble order is Q4_1's). 8 bits: ``q - 128`` as int8 with offset
    ``zero + 128 * scale`` (0 exactly for GGUF Q8_0); a group longer than 32 repeats its scale
    and offset in each of its blocks."""
    spec = q.spec
    if not (spec.bits in BLOCK_BYTES and spec.group_size % GROUP == 0 and len(q.shape) == 2):
        raise ValueError(f"blocks hold 2-D int4/int8 groups of {GROUP}, not {spec} {q.shape}")
    if spec.bits == 4 and spec.group_size != GROUP:
        raise ValueError(f"4-bit blocks hold groups of {GROUP}, not {spec.group_size}")
    N, K = q.shape
    G, bits, rep = K // GROUP, spec.bits, spec.group_size // GROUP
    out = torch.empty(N, G * BLOCK_BYTES[bits], dtype=torch.uint8)
    scale, offset, values = _fields(out, bits)
    s = q.scale.reshape(N, -1).float().repeat_interleave(rep, dim=1)
    z = q.zero.reshape(N, -1).float().repeat_interleave(rep, dim=1)
    scale.copy_(s)
    if bits == 4:
        offset.copy_(z)
        values.copy_(q.data.reshape(N, -1))
    else:
        offset.copy_(z + 128 * s)
        torch.bitwise_xor(q.data.reshape(N, -1), 0x80, out=values)
    return out


def _fields(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views of blocks (N, G * block bytes): scales and offsets (N, G) fp16, values (N, bytes)."""
    G = w.shape[1] // BLOCK_BYTES[bits]
    return w[:, : 2 * G].view(SCALE_DTYPE), w[:, 2 * G : 4 * G].view(SCALE_DTYPE), w[:, 4 * G :]


def from_blocks(w: torch.Tensor, bits: int) -> torch.Tensor:
    """The fp32 weight (N, K) that blocks ``w`` hold (for tests and checks)."""
    N = w.shape[0]
    scale, offset, raw = _fields(w, bits)
    G = scale.shape[1]
    raw = raw.reshape(N, G, -1)
    if bits == 4:
        q = torch.cat((raw & 15, raw >> 4), dim=-1).float()
    else:
        q = raw.contiguous().view(torch.int8).float()
    return (scale.float()[..., None] * q + offset.float()[..., None]).view(N, -1)


@dataclass
class Blocks:
    """A weight (out, in) held as blocks (see ``to_blocks``); ``linear`` is ``x @ W.T`` in fp32
    (a weight form of ``ops.linear``)."""

    data: torch.Tensor  # (out, in / 32 * block bytes) uint8
    bits: int
    form = "blocks"

    @property
    def shape(self) -> tuple[int, int]:
        N, nbytes = self.data.shape
        return N, nbytes // BLOCK_BYTES[self.bits] * GROUP

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() == 2 and bias is None and x.dtype == torch.float32:  # no reshapes
            return kernels.block_mm(x, self.data, self.bits)
        *lead, K = x.shape
        y = kernels.block_mm(x.reshape(-1, K).float(), self.data, self.bits)
        if bias is not None:
            y += bias
        return y.view(*lead, y.shape[1])

    @classmethod
    def from_quantized(cls, q: QTensor) -> Blocks:
        kernels.require()
        return cls(to_blocks(q), q.spec.bits)

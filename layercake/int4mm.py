"""Matmul on packed int4 weights, on the CPU: PyTorch's fused int4 kernel, no dequantize step.

``torch.ops.aten._weight_int4pack_mm_for_cpu`` multiplies bf16 activations by int4 weights
held in its own packed form, unpacking inside the kernel. Measured on this machine (2 threads,
a 1536x576 weight): 39 us for one row of activations (11 GB/s of packed weights) and ~150
GFLOP/s from 32 rows on, the speed of an fp32 GEMM on dequantized weights, with none of the
dequantization (which moved ~1 GB/s). Activations and results pass through bf16 (relative error
~2e-3); fp32 or fp16 activations take a path 20-30x slower, so they are converted.

The packed form: output rows go in blocks of ``BLOCK_N`` = 64; a block's bytes are contiguous
and depend on that block's values only, so any range of whole blocks is one byte range and can
be packed, placed and read alone. Scales and zeros are one (scale, zero) bf16 pair per group per
row, with ``w = (q - 8) * scale + zero``: our asymmetric form ``zero_min + scale * q`` with
``zero = zero_min + 8 * scale``. The kernel wants them as one contiguous ``(K / G, N, 2)``
tensor (a strided view gives wrong results, silently), so they are kept per row, ``(N, K/G*2)``,
where rows can be split and placed, and transposed into that shape before use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from layercake.quant import BLOCK_ELEMENTS, QTensor, QuantSpec

BLOCK_N = 64
GROUPS = (32, 64, 128, 256)  # the group sizes the kernel takes
SZ_DTYPE = torch.bfloat16

_mm = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
_convert = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)


def kernel_ok(shape: tuple[int, ...], spec: QuantSpec, device: torch.device | str) -> bool:
    """Whether a weight of ``shape`` (out, in) quantized by ``spec`` can use the kernel."""
    return (
        _mm is not None
        and torch.device(device).type == "cpu"
        and spec.bits == 4
        and spec.group_size in GROUPS
        and len(shape) == 2
        and shape[0] % BLOCK_N == 0
        and shape[1] % spec.group_size == 0
    )


def data_shape(shape: tuple[int, int]) -> tuple[int, int]:
    """The packed values of a weight (out, in) as rows of whole blocks: (out / 64, 32 * in)."""
    return shape[0] // BLOCK_N, BLOCK_N * shape[1] // 2


def sz_shape(shape: tuple[int, int], spec: QuantSpec) -> tuple[int, int]:
    """The scales and zeros of a weight (out, in), one row per output row: (out, 2 * groups)."""
    return shape[0], 2 * (shape[1] // spec.group_size)


def pack(q: QTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A quantized 2-D weight (int4, any group in ``GROUPS``) -> (data, sz) in the packed form,
    shaped ``data_shape`` (uint8) and ``sz_shape`` (bf16). The values are moved, not recomputed;
    the int32 transient of the kernel's packing stays at most ``BLOCK_ELEMENTS``."""
    N, K = q.shape
    G = q.spec.group_size
    data = torch.empty(data_shape((N, K)), dtype=torch.uint8)
    flat = data.view(N, K // 2)  # the kernel's own (out, in / 2) view of the same bytes
    step = max(BLOCK_N, BLOCK_ELEMENTS // max(1, K) // BLOCK_N * BLOCK_N)
    for r in range(0, N, step):
        packed = q.data[r : r + step].reshape(-1, K // G, G // 2)  # (n, groups, G/2)
        vals = torch.empty(packed.shape[0], K // G, G, dtype=torch.int32)
        vals[..., : G // 2] = packed & 15
        vals[..., G // 2 :] = packed >> 4
        flat[r : r + step] = _convert(vals.view(-1, K), 1)
    scale = q.scale.reshape(N, K // G).float()
    sz = torch.empty(N, K // G, 2, dtype=SZ_DTYPE)
    sz[..., 0] = scale
    sz[..., 1] = q.zero.reshape(N, K // G).float() + 8 * scale
    return data, sz.view(sz_shape((N, K), q.spec))


def sz_for_kernel(rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row scales and zeros (n, 2 * groups) -> the kernel's contiguous (groups, n, 2)."""
    n = rows.shape[0]
    src = rows.view(n, -1, 2).transpose(0, 1)
    return src.contiguous() if out is None else out.view(src.shape).copy_(src)


@dataclass
class PackedInt4:
    """A weight (out, in) in the kernel's form: ``data`` (out, in / 2) uint8, ``sz`` (groups,
    out, 2) bf16 contiguous; ``linear`` is ``x @ W.T`` in fp32 out."""

    data: torch.Tensor
    sz: torch.Tensor
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape[0], self.data.shape[1] * 2

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        N, K = self.shape
        x2 = x.reshape(-1, K).to(SZ_DTYPE)
        y = _mm(x2, self.data, self.group_size, self.sz).view(*x.shape[:-1], N)
        y = y.to(x.dtype)
        if bias is not None:
            y += bias
        return y

    @classmethod
    def from_parts(cls, data: torch.Tensor, sz: torch.Tensor, spec: QuantSpec) -> PackedInt4:
        """From ``pack``'s (data, sz) rows."""
        out = data.numel() * 2 // (sz.shape[1] // 2 * spec.group_size)
        return cls(data.view(out, -1), sz_for_kernel(sz), spec.group_size)


class Int4Linear(nn.Module):
    """``y = x @ W.T + b`` with W a ``PackedInt4`` (held, or bound per use by the offload
    executor: ``weight`` is a plain attribute, ``bias`` a parameter slot)."""

    def __init__(self, weight: PackedInt4 | None, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = weight
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight.linear(x, self.bias)

    def extra_repr(self) -> str:
        if self.weight is None:
            return "unbound"
        out, width = self.weight.shape
        return f"in={width}, out={out}, int4-g{self.weight.group_size} packed"

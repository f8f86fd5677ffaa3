"""Matmul on packed int4 (and per-row int8) weights, on the CPU: PyTorch's fused kernels, no
dequantize step.

``torch.ops.aten._weight_int4pack_mm_for_cpu`` multiplies bf16 activations by int4 weights
held in its own packed form, unpacking inside the kernel: from 32 rows of activations on it
runs at the speed of an fp32 GEMM on dequantized weights, with none of the dequantization (the
README's "Compression" section has the figures). Activations and results pass through bf16; fp32
or fp16 activations take a much slower path, so they are converted.

The packed form: output rows go in tiles of ``TILE_N`` = 64; a tile's bytes are contiguous
and depend on that tile's values only, so any range of whole tiles is one byte range and can
be packed, placed and read alone. Scales and zeros are one (scale, zero) bf16 pair per group per
row, with ``w = (q - 8) * scale + zero``: our asymmetric form ``zero_min + scale * q`` with
``zero = zero_min + 8 * scale``. The kernel wants them as one contiguous ``(K / G, N, 2)``
tensor (a strided view gives wrong results, silently), so they are kept per row, ``(N, K/G*2)``,
where rows can be split and placed, and transposed into that shape before use.

int8 with one group per row (the form an int4 model's output head is held in: 8 bits where a
4-bit head would cost perplexity, as llama.cpp keeps ``output.weight`` above its Q4 types) runs
on ``torch.ops.aten._weight_int8pack_mm`` (bf16, symmetric int8 with a scale per row): our
asymmetric ``zero + scale * q`` is ``scale * (q - 128) + (zero + 128 * scale)``, the second term
a per-row offset times the sum of the activations.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from layercake.quant import SLAB_ELEMENTS, QTensor, QuantSpec, dequantize

TILE_N = 64
GROUPS = (32, 64, 128, 256)  # the group sizes the kernel takes
SZ_DTYPE = torch.bfloat16

_mm = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
_convert = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
_mm8 = getattr(torch.ops.aten, "_weight_int8pack_mm", None)


def kernel_ok(shape: tuple[int, ...], spec: QuantSpec, device: torch.device | str) -> bool:
    """Whether a weight of ``shape`` (out, in) quantized by ``spec`` can use the kernel."""
    return (
        _mm is not None
        and torch.device(device).type == "cpu"
        and spec.bits == 4
        and spec.group_size in GROUPS
        and len(shape) == 2
        and shape[0] % TILE_N == 0
        and shape[1] % spec.group_size == 0
    )


def kernel8_ok(shape: tuple[int, ...], spec: QuantSpec, device: torch.device | str) -> bool:
    """Whether an int8 weight of ``shape`` (one group per row) can use the int8 kernel."""
    return (
        _mm8 is not None
        and torch.device(device).type == "cpu"
        and spec.bits == 8
        and len(shape) == 2
        and spec.group_size == shape[1]
        and shape[1] % 16 == 0  # other widths crash the kernel (seen: 100, 104, 120)
    )


def data_shape(shape: tuple[int, int]) -> tuple[int, int]:
    """The packed values of a weight (out, in) as rows of whole tiles: (out / 64, 32 * in)."""
    return shape[0] // TILE_N, TILE_N * shape[1] // 2


def sz_shape(shape: tuple[int, int], spec: QuantSpec) -> tuple[int, int]:
    """The scales and zeros of a weight (out, in), one row per output row: (out, 2 * groups)."""
    return shape[0], 2 * (shape[1] // spec.group_size)


def pack(q: QTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A quantized 2-D weight (int4, any group in ``GROUPS``) -> (data, sz) in the packed form,
    shaped ``data_shape`` (uint8) and ``sz_shape`` (bf16). The values are moved, not recomputed;
    the int32 transient of the kernel's packing stays at most ``SLAB_ELEMENTS``."""
    N, K = q.shape
    G = q.spec.group_size
    data = torch.empty(data_shape((N, K)), dtype=torch.uint8)
    flat = data.view(N, K // 2)  # the kernel's own (out, in / 2) view of the same bytes
    step = max(TILE_N, SLAB_ELEMENTS // max(1, K) // TILE_N * TILE_N)
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
    form = "int4pack"

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
        """From ``pack``'s (data, sz) rows (``sz`` has one row per output row)."""
        return cls(data.view(sz.shape[0], -1), sz_for_kernel(sz), spec.group_size)


@functools.cache
def _ones(rows: int) -> torch.Tensor:
    return torch.ones(rows, dtype=SZ_DTYPE)


@dataclass
class PackedInt8:
    """A weight (out, in) as int8 ``data`` with an fp32 ``scale`` and (asymmetric) an fp32
    ``offset`` per row: ``W = scale * data + offset``. The kernel runs with unit scales (bf16
    activations; fp32 ones take a much slower path) and the fp32 scales are applied to its
    result, so they are not rounded to bf16."""

    data: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None = None
    form = "int8row"

    def __post_init__(self) -> None:
        # the kernel's unit scales: made here, not in ``linear`` (a compiled step must see a
        # plain input tensor, not a constant it would lower)
        self.ones = _ones(self.data.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.data.shape)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        N, K = self.shape
        x2 = x.reshape(-1, K)
        y = _mm8(x2.to(SZ_DTYPE), self.data, self.ones).float().mul_(self.scale)
        if self.offset is not None:
            y.addmm_(x2.sum(-1, keepdim=True), self.offset.view(1, N))
        if bias is not None:
            y += bias
        return y.view(*x.shape[:-1], N)

    @classmethod
    def empty(cls, rows: int, width: int, out: torch.Tensor | None = None) -> PackedInt8:
        """Uninitialized, in ``out`` (uint8, at least ``nbytes8`` bytes, 4-aligned) or new."""
        out = torch.empty(nbytes8(rows, width), dtype=torch.uint8) if out is None else out
        a = (rows * width + 3) // 4 * 4
        data = out[: rows * width].view(rows, width).view(torch.int8)
        scale = out[a : a + 4 * rows].view(torch.float32)
        return cls(data, scale, out[a + 4 * rows : a + 8 * rows].view(torch.float32))

    def fill(self, r0: int, rows: torch.Tensor) -> None:
        """Rows [r0, r0 + n) from the row layout of int8 with one group per row (uint8 values,
        fp16 scale, fp16 zero): values moved by 128, ``offset = zero + 128 * scale``."""
        n, K = rows.shape[0], self.shape[1]
        torch.bitwise_xor(rows[:, :K], 0x80, out=self.data[r0 : r0 + n].view(torch.uint8))
        s16 = rows[:, K : K + 2].view(torch.float16).view(n)
        self.scale[r0 : r0 + n].copy_(s16)
        offset = self.offset[r0 : r0 + n].copy_(s16).mul_(128)
        offset.add_(rows[:, K + 2 : K + 4].view(torch.float16).view(n))

    @classmethod
    def from_rows(
        cls, rows: torch.Tensor, spec: QuantSpec, out: torch.Tensor | None = None
    ) -> PackedInt8:
        """From the row layout (see ``fill``); into ``out`` when given, else new memory."""
        p = cls.empty(rows.shape[0], spec.group_size, out)
        p.fill(0, rows)
        return p

    @classmethod
    def from_float(cls, w: torch.Tensor) -> PackedInt8:
        """Symmetric per-row int8 of a float weight (out, in), ``scale = max |w| / 127``, in
        row slabs."""
        N, K = w.shape
        p = cls(torch.empty(N, K, dtype=torch.int8), torch.empty(N))
        step = max(1, SLAB_ELEMENTS // K)
        for r in range(0, N, step):
            p._symmetric(r, w[r : r + step].float())
        return p

    @classmethod
    def from_quantized(cls, q: QTensor) -> PackedInt8:
        """Symmetric per-row int8 of a group-quantized 2-D weight (e.g. GGUF Q8_0 rows: an
        extra rounding of at most half a step of the row's scale), dequantized slab by slab
        through one small fp32 buffer."""
        N, K = q.shape
        p = cls(torch.empty(N, K, dtype=torch.int8), torch.empty(N))
        step = max(1, SLAB_ELEMENTS // 16 // K)
        buf = torch.empty(min(N, step), K)
        for r in range(0, N, step):
            n = min(step, N - r)
            p._symmetric(r, dequantize(q.row_range(r, r + n), buf[:n]))
        return p

    def _symmetric(self, r0: int, w: torch.Tensor) -> None:
        s = w.abs().amax(1) / 127
        s = torch.where(s > 0, s, 1.0)
        self.data[r0 : r0 + len(w)].copy_(torch.round(w / s[:, None]).clamp_(-127, 127))
        self.scale[r0 : r0 + len(w)].copy_(s)


def int8_available() -> bool:
    return _mm8 is not None


def nbytes8(rows: int, width: int) -> int:
    """Bytes of a ``PackedInt8`` of ``rows`` x ``width``: values, scales, offsets (aligned)."""
    return (rows * width + 3) // 4 * 4 + 8 * rows

"""Group-wise 4-bit and 8-bit quantization of weights and KV cache.

Every group of ``group_size`` consecutive values along one dimension (the input dimension of a
weight, ``head_dim`` of the cache) keeps its own ``scale`` and ``zero`` (fp16), both bits widths
asymmetric: ``x ~ zero + scale * q`` with ``zero = min`` of the group, ``scale = (max - min) /
(2**bits - 1)`` and ``q`` an unsigned integer in [0, 2**bits - 1]. The error of a value is at most
``scale / 2`` (plus the fp16 rounding of ``zero`` and ``scale``). GGUF's Q4_1 is exactly this form
(group 32); Q4_0 and Q8_0, symmetric, are too, with ``zero = -8 d`` and ``zero = -128 d``, so
those blocks convert to a ``QTensor`` by moving bytes, without a float round trip.

Packing (int4): byte ``j`` of a group holds value ``j`` in its low nibble and value
``j + group_size / 2`` in its high nibble (GGUF's order), so unpacking writes two contiguous
half-groups. The row layout (``to_rows`` / ``from_rows``) puts one row's packed data, scales and
zeros side by side: any range of rows is one contiguous byte range, which the offload tiers place
and read like rows of any other tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from layercake.errors import LayercakeError

BITS = (4, 8)
SCALE_DTYPE = torch.float16
SLAB_ELEMENTS = 16 * 2**20  # values dequantized (or quantized) per slab: 64 MB of fp32


@dataclass(frozen=True)
class QuantSpec:
    """How a tensor is compressed: ``bits`` per value, one scale and zero per ``group_size``."""

    bits: int = 4
    group_size: int = 32

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise LayercakeError(f"compression bits must be 4 or 8, not {self.bits}")
        if self.group_size < 4 or self.group_size % 4:  # whole bytes, even fp16 offsets
            raise LayercakeError(
                f"group size must be a positive multiple of 4, not {self.group_size}"
            )

    def __str__(self) -> str:
        return f"int{self.bits}-g{self.group_size}"

    def check(self, width: int, what: str) -> None:
        if width % self.group_size:
            raise LayercakeError(
                f"group size {self.group_size} does not divide {what}'s width {width}: "
                "choose a group size that does (--group-size)"
            )

    def row_bytes(self, width: int) -> int:
        """Bytes of one row of ``width`` values in the row layout: data, scales, zeros."""
        groups = width // self.group_size
        return width * self.bits // 8 + 2 * groups * SCALE_DTYPE.itemsize


@dataclass
class QTensor:
    """A quantized tensor of logical ``shape``, groups along its last dimension.

    ``data`` (..., width * bits / 8) uint8, ``scale`` and ``zero`` (..., width / group_size) fp16;
    the leading dimensions are the logical ones. Fields may be strided views (of a row layout)."""

    data: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    spec: QuantSpec
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.zero))

    def row_range(self, r0: int, r1: int) -> QTensor:
        """Rows [r0, r1) of a 2-D tensor, as views."""
        n = min(r1, self.shape[0]) - r0
        return QTensor(self.data[r0:r1], self.scale[r0:r1], self.zero[r0:r1], self.spec,
                       (n, *self.shape[1:]))  # fmt: skip

    def to_rows(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The row layout: a (rows, row_bytes) uint8 tensor (into ``out`` when given)."""
        width = self.shape[-1]
        rows = self.data.numel() // max(1, self.data.shape[-1]) if self.data.dim() else 1
        rb = self.spec.row_bytes(width)
        out = torch.empty(rows, rb, dtype=torch.uint8) if out is None else out
        db, g = width * self.spec.bits // 8, width // self.spec.group_size
        out[:, :db] = self.data.reshape(rows, db)
        out[:, db : db + 2 * g] = self.scale.reshape(rows, g).view(torch.uint8)
        out[:, db + 2 * g :] = self.zero.reshape(rows, g).view(torch.uint8)
        return out

    @classmethod
    def from_rows(cls, rows: torch.Tensor, shape: tuple[int, ...], spec: QuantSpec) -> QTensor:
        """Views of a row layout (rows, row_bytes) uint8 as a QTensor of ``shape``; no copy."""
        width = shape[-1]
        db, g = width * spec.bits // 8, width // spec.group_size
        lead = tuple(shape[:-1])
        data = rows[:, :db].unflatten(0, lead) if lead else rows[0, :db]
        scale = rows[:, db : db + 2 * g].view(SCALE_DTYPE)
        zero = rows[:, db + 2 * g : db + 4 * g].view(SCALE_DTYPE)
        if lead:
            scale, zero = scale.unflatten(0, lead), zero.unflatten(0, lead)
        else:
            scale, zero = scale[0], zero[0]
        return cls(data, scale, zero, spec, tuple(shape))


def quantize(x: torch.Tensor, bits: int = 4, group_size: int = 32, dim: int = -1) -> QTensor:
    """Quantize ``x`` in groups of ``group_size`` along ``dim`` (moved last in the result, whose
    ``shape`` is ``x.movedim(dim, -1).shape``). Vectorized: no loop over groups."""
    spec = QuantSpec(bits, group_size)
    x = x.movedim(dim, -1)
    width = x.shape[-1]
    spec.check(width, f"a tensor of shape {tuple(x.shape)}")
    G, levels = group_size, 2**bits - 1
    xg = x.float().unflatten(-1, (width // G, G))  # (..., groups, G)
    lo, hi = xg.amin(-1), xg.amax(-1)
    scale = ((hi - lo) / levels).to(SCALE_DTYPE)
    zero = lo.to(SCALE_DTYPE)
    if not (torch.isfinite(scale).all() and torch.isfinite(zero).all()):
        raise LayercakeError("cannot quantize: values are not finite or beyond the fp16 range")
    s = scale.float()
    s = torch.where(s > 0, s, 1.0)  # a constant group: every q is 0, the value is `zero`
    q = ((xg - zero.float()[..., None]) / s[..., None]).round_().clamp_(0, levels)
    q = q.to(torch.uint8)
    if bits == 4:
        q = q[..., : G // 2] | (q[..., G // 2 :] << 4)
    return QTensor(q.flatten(-2), scale, zero, spec, tuple(x.shape))


def dequantize(
    q: QTensor, out: torch.Tensor | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The values of ``q`` (its ``shape``), written into ``out`` when given (any float dtype and
    device of ``q``; the hot path: nothing the size of the result is allocated)."""
    if out is None:
        out = torch.empty(q.shape, dtype=dtype, device=q.data.device)
    elif tuple(out.shape) != tuple(q.shape):
        raise LayercakeError(f"dequantize: out is {tuple(out.shape)}, the tensor {q.shape}")
    if out.numel() == 0:
        return out
    G = q.spec.group_size
    og = out.unflatten(-1, (out.shape[-1] // G, G))  # (..., groups, G)
    if q.spec.bits == 4:
        packed = q.data.unflatten(-1, (og.shape[-2], G // 2))
        og[..., : G // 2].copy_(packed & 15)
        og[..., G // 2 :].copy_(packed >> 4)
    else:
        og.copy_(q.data.unflatten(-1, (og.shape[-2], G)))
    scale, zero = q.scale.to(out.dtype)[..., None], q.zero.to(out.dtype)[..., None]
    og.mul_(scale).add_(zero)
    return out


def quantize_rows(
    src: torch.Tensor, spec: QuantSpec, out: torch.Tensor | None = None
) -> torch.Tensor:
    """A 2-D tensor (any float dtype, e.g. a bf16 view of a checkpoint) quantized along its rows
    into the row layout, in slabs: the fp32 transient stays at most ``SLAB_ELEMENTS``."""
    rows, width = src.shape
    spec.check(width, f"a tensor of shape {tuple(src.shape)}")
    out = torch.empty(rows, spec.row_bytes(width), dtype=torch.uint8) if out is None else out
    step = max(1, SLAB_ELEMENTS // max(1, width))
    for r in range(0, rows, step):
        quantize(src[r : r + step], spec.bits, spec.group_size).to_rows(out[r : r + step])
    return out


# GGUF block types that are this module's form: (bits, bytes per 32-value block)
GGUF_BLOCKS = {"Q4_0": (4, 18), "Q4_1": (4, 20), "Q8_0": (8, 34)}


def from_gguf(blocks: torch.Tensor, qtype: str) -> tuple[torch.Tensor, QuantSpec]:
    """GGUF Q4_0 / Q4_1 / Q8_0 rows (rows, bytes per row) uint8 -> (row layout, spec): the
    bytes are moved, the values are exactly GGUF's (zero = -8 d for Q4_0, -128 d for Q8_0 is an
    exact fp16 product)."""
    if qtype not in GGUF_BLOCKS:
        raise LayercakeError(f"GGUF {qtype} blocks have no int4/int8 group form")
    bits, size = GGUF_BLOCKS[qtype]
    spec = QuantSpec(bits, 32)
    rows = blocks.shape[0]
    b = blocks.reshape(rows, -1, size)  # (rows, blocks, size)
    nb = b.shape[1]
    width = nb * 32
    out = torch.empty(rows, spec.row_bytes(width), dtype=torch.uint8)
    db = width * bits // 8
    d = b[..., 0:2].contiguous().view(SCALE_DTYPE)  # (rows, nb, 1)
    out[:, db : db + 2 * nb].view(SCALE_DTYPE).view(rows, nb, 1).copy_(d)
    zeros = out[:, db + 2 * nb :].view(SCALE_DTYPE).view(rows, nb, 1)
    data = out[:, :db].view(rows, nb, db // nb)
    if qtype == "Q4_1":
        zeros.copy_(b[..., 2:4].contiguous().view(SCALE_DTYPE))
        data.copy_(b[..., 4:])
    elif qtype == "Q4_0":
        torch.mul(d, -8, out=zeros)
        data.copy_(b[..., 2:])
    else:  # Q8_0: int8 q -> uint8 q + 128
        torch.mul(d, -128, out=zeros)
        torch.bitwise_xor(b[..., 2:], 0x80, out=data)
    return out, spec


class Workspace:
    """A reusable fp32 buffer that quantized layers dequantize into (one at a time), and the
    time spent doing it."""

    def __init__(self, numel: int, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        self.buffer = torch.empty(numel, dtype=dtype, device=device)
        self.seconds = 0.0
        self.calls = 0


@dataclass(frozen=True)
class Compression:
    """What is held compressed: linear weights (``weight``), the KV cache (``cache``). With
    ``gguf_native``, GGUF Q4_0 / Q4_1 / Q8_0 weights keep their own form (group 32)."""

    weight: QuantSpec | None = None
    cache: QuantSpec | None = None
    gguf_native: bool = True

    def head_spec(self, width: int) -> QuantSpec:
        """The output head's form: int8 with one group per row under 4-bit weights (a 4-bit
        head costs perplexity, measured: SmolLM2 +3.2 % vs +0.0 % at 8 bits; llama.cpp keeps
        ``output.weight`` above its Q4 types for the same reason), else the weights' own."""
        if self.weight.bits < 8 and width % 4 == 0:
            return QuantSpec(8, width)
        return self.weight

    def cache_spec(self, head_dim: int) -> QuantSpec | None:
        """The cache's groups run along head_dim: one group per head when it is narrower."""
        if self.cache is None:
            return None
        spec = self.cache
        if head_dim <= spec.group_size:
            spec = QuantSpec(spec.bits, head_dim)
        spec.check(head_dim, "the KV cache's head_dim")
        return spec


def compression(
    compress_weight: bool = False,
    compress_cache: bool = False,
    bits: int | None = None,
    group_size: int | None = None,
    gguf_native: bool = True,
) -> Compression | None:
    """Options (``load``'s and the CLI's) -> a ``Compression``, or None when nothing is."""
    if not (compress_weight or compress_cache):
        if bits is not None or group_size is not None:
            raise LayercakeError(
                "--compress-bits / --group-size need --compress-weight or --compress-cache"
            )
        return None
    spec = QuantSpec(4 if bits is None else bits, 32 if group_size is None else group_size)
    return Compression(
        spec if compress_weight else None, spec if compress_cache else None, gguf_native
    )

"""Matmul on per-output-channel int8 weights, on the CPU: ``torch.ops.aten._weight_int8pack_mm``.

The kernel multiplies activations by an int8 weight (out, in) and one scale per output row,
with no dequantize step. The decode path uses it for the LM head when it is stored as 8-bit
groups (the embedded SmolLM2 GGUF's tied head is Q8_0, 49152x576): the group-32 values are
re-quantized per row once at load, ``w = scale[n] * q`` with ``scale[n] = max |w[n]| / 127``.
The extra rounding is at most half a step of the row's scale (perplexity change measured by
``benchmarks/quality.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from layercake.int4mm import Int4Linear
from layercake.quant import BLOCK_ELEMENTS, QTensor, dequantize

_mm = getattr(torch.ops.aten, "_weight_int8pack_mm", None)


def available() -> bool:
    return _mm is not None


@dataclass
class PackedInt8:
    """A weight (out, in): ``data`` int8 (out, in), ``scale`` (out,) fp32; ``linear`` is
    ``x @ W.T`` in fp32. The kernel runs on bf16 activations (fp32 ones take a path 10-20x
    slower) with unit scales; the fp32 scales are applied to its result."""

    data: torch.Tensor
    scale: torch.Tensor

    def __post_init__(self) -> None:
        self.ones = torch.ones(self.data.shape[0], dtype=torch.bfloat16)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.data.shape)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        N, K = self.shape
        y = _mm(x.reshape(-1, K).to(torch.bfloat16), self.data, self.ones)  # (M, N) bf16
        y = y.float().mul_(self.scale).view(*x.shape[:-1], N)
        if bias is not None:
            y += bias
        return y

    @classmethod
    def from_float(cls, w: torch.Tensor) -> PackedInt8:
        """Symmetric per-row int8 of a float weight (out, in), in row blocks."""
        N, K = w.shape
        data = torch.empty(N, K, dtype=torch.int8)
        scale = torch.empty(N)
        step = max(1, BLOCK_ELEMENTS // K)
        for r in range(0, N, step):
            _rows(w[r : r + step].float(), data[r : r + step], scale[r : r + step])
        return cls(data, scale)

    @classmethod
    def from_quantized(cls, q: QTensor) -> PackedInt8:
        """From a group-quantized 2-D weight (e.g. GGUF Q8_0 rows), dequantized block by block
        through one small fp32 buffer."""
        N, K = q.shape
        data = torch.empty(N, K, dtype=torch.int8)
        scale = torch.empty(N)
        step = max(1, BLOCK_ELEMENTS // 16 // K)
        buf = torch.empty(min(N, step), K)
        for r in range(0, N, step):
            n = min(step, N - r)
            part = QTensor(q.data[r : r + n], q.scale[r : r + n], q.zero[r : r + n], q.spec, (n, K))
            w = dequantize(part, buf[:n])
            _rows(w, data[r : r + n], scale[r : r + n])
        return cls(data, scale)


def _rows(w: torch.Tensor, data: torch.Tensor, scale: torch.Tensor) -> None:
    s = w.abs().amax(1) / 127
    s = torch.where(s > 0, s, 1.0)
    data.copy_(torch.round(w / s[:, None]).clamp_(-127, 127))
    scale.copy_(s)


class Int8Linear(Int4Linear):
    """``y = x @ W.T + b`` with W a ``PackedInt8`` (the same module as ``Int4Linear``: the
    weight brings its own ``linear``)."""

    def extra_repr(self) -> str:
        out, width = self.weight.shape
        return f"in={width}, out={out}, int8 per-channel packed"

"""Prepacked fp32 GEMM for linear layers on the CPU.

For the small row counts of decoding (a batch of 1-64 tokens), MKL's sgemm spends most of its
time re-packing the weight matrix on every call; packing each weight once at load time (the same
MKL packed-GEMM path PyTorch's inductor uses when it freezes a CPU model) makes those calls much
faster (README, "Benchmarks"), with results equal within float rounding. The weight is packed
straight from the checkpoint in row slabs through one small scratch buffer, so no unpacked fp32
copy is ever held.
"""

from __future__ import annotations

import torch

SLAB_BYTES = 64 * 2**20  # rows packed per slab: bounds the scratch buffer, and the transient


def _pack_hint(rows: int) -> int:
    """The batch size MKL tunes a packing for (any batch works with the result). For weights of
    >= 1536 output rows a hint of 1024 ran prefill-sized batches faster than a hint of 32 and
    decoding batches (1-32) as fast; for fewer rows it slowed small batches down, so those keep
    32 (the figures are in the README's "Benchmarks")."""
    return 1024 if rows >= 1536 else 32


def packing_available() -> bool:
    mkl = getattr(torch.ops, "mkl", None)
    return (
        torch.backends.mkl.is_available()
        and _mkl_linear is not None
        and hasattr(mkl, "_mkl_reorder_linear_weight")
    )


try:  # bound once: looking the op up through torch.ops costs microseconds on every call
    _mkl_linear = torch.ops.mkl._mkl_linear
except (AttributeError, RuntimeError):  # a PyTorch built without MKL
    _mkl_linear = None


class MKLPacked:
    """A weight (out, in) held in MKL's packed layout, in slabs of output rows; ``linear`` is
    ``x @ W.T + b`` in fp32 (the form ``ops.linear`` names "mkl")."""

    form = "mkl"

    def __init__(self, source: torch.Tensor, scratch: torch.Tensor | None = None) -> None:
        """Pack ``source`` (out, in), any float dtype (e.g. a bf16 view of the checkpoint);
        ``scratch`` is a reusable fp32 buffer of at least one slab."""
        self.shape = tuple(source.shape)
        out_features, in_features = self.shape
        rows = max(1, SLAB_BYTES // (4 * in_features))
        self.slabs: list[torch.Tensor] = []
        self.stubs: list[torch.Tensor] = []
        for r0 in range(0, out_features, rows):
            part = source[r0 : r0 + rows]
            if part.dtype != torch.float32:
                if scratch is None or scratch.numel() < part.numel():
                    scratch = torch.empty(part.numel())
                part = scratch[: part.numel()].view(part.shape).copy_(part)
            self.slabs.append(
                torch.ops.mkl._mkl_reorder_linear_weight(part.contiguous(), _pack_hint(len(part)))
            )
            # the op reads only the shape and dtype of the plain weight: a zero-stride stand-in
            self.stubs.append(torch.zeros(1).expand(part.shape))

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        out_features, in_features = self.shape
        x2 = x.reshape(-1, in_features).contiguous()  # (M, in)
        M = x2.shape[0]
        if len(self.slabs) == 1:  # the common case, kept lean: decoding is call-bound
            y = _mkl_linear(x2, self.slabs[0], self.stubs[0], bias, M)
        else:
            outs = [_mkl_linear(x2, b, s, None, M) for b, s in zip(self.slabs, self.stubs)]
            y = torch.cat(outs, dim=-1)  # (M, out)
            if bias is not None:
                y += bias
        return y.view(*x.shape[:-1], out_features)

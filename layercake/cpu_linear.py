"""Prepacked fp32 GEMM for linear layers on the CPU.

For the small row counts of decoding (a batch of 1-64 tokens), MKL's sgemm spends most of its
time re-packing the weight matrix on every call; packing each weight once at load time (the same
MKL packed-GEMM path PyTorch's inductor uses when it freezes a CPU model) makes those calls about
twice as fast and leaves results equal within float rounding. Memory is the same as the plain fp32
weight, which is freed once packed. Falls back to ``nn.Linear`` where the op is unavailable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_PACK_HINT = 32  # row count MKL tunes the packing for; any row count works with the result


def packing_available() -> bool:
    return hasattr(torch.ops, "mkl") and hasattr(torch.ops.mkl, "_mkl_linear") and (
        torch.backends.mkl.is_available()
    )


class PackedLinear(nn.Module):
    """``y = x @ W.T + b`` with W held in MKL's packed layout (fp32, CPU)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkl._mkl_reorder_linear_weight(w.contiguous(), _PACK_HINT)
        # the op reads only the shape and dtype of the plain weight: a zero-stride stand-in
        self.shape_stub = torch.zeros(1, dtype=w.dtype).expand(self.out_features, self.in_features)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).contiguous()  # (M, in)
        y = torch.ops.mkl._mkl_linear(x2, self.packed, self.shape_stub, self.bias, x2.shape[0])
        return y.view(*x.shape[:-1], self.out_features)


def pack_linears(module: nn.Module) -> int:
    """Replace every fp32 CPU ``nn.Linear`` under ``module`` by a ``PackedLinear``, one at a
    time so the peak memory grows by one weight at most. Returns how many were packed."""
    if not packing_available():
        return 0
    # names, not module references: each replaced nn.Linear (and its fp32 weight) must be
    # freed as soon as it is packed, or the peak holds every weight twice
    names = [n for n, m in module.named_modules() if _packable(m)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        setattr(parent, child, PackedLinear(getattr(parent, child)))
    return len(names)


def _packable(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return type(m) is nn.Linear and w.dtype == torch.float32 and w.device.type == "cpu"

"""How a linear layer multiplies: one module (``Linear``) holding its weight in one of a few
forms, and ONE function (``choose``) that picks the form from the weight's shape, how it is
stored, the device, the compute dtype and its tier.

The forms (each an object with ``shape``, ``form`` and ``linear(x, bias)``; fp32 out on the CPU):

- ``dense``: a plain tensor in the compute dtype, multiplied by ``F.linear``; the model's own
  ``nn.Linear`` (GPU, compiled graphs, and the CPU fallback).
- ``mkl``: fp32 packed once for MKL's GEMM (``ops.mkl``): eager CPU fp32, float checkpoints.
- ``bf16``: bf16 rows multiplied as stored (no fp32 copy) by our ``bf16_mm``, or on AMX tiles
  with fp32 products (``kernels.bf16x3_mm``) where the CPU has them: CPU fp32 compute.
- ``blocks``: int4/int8 GGUF-style blocks on our ``block_mm`` (``ops.blocks``): Q4_0 / Q4_1 /
  Q8_0 weights kept bit for bit, activations rounded to int8 per block as llama.cpp does.
- ``int4pack`` / ``int8row``: PyTorch's int4 / per-row int8 CPU kernels (``ops.int4pack``).
- ``dequant``: the quantized row layout, dequantized block by block just before each use.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from layercake.ops import kernels
from layercake.ops.blocks import Blocks
from layercake.ops.blocks import takes as blocks_take
from layercake.ops.int4pack import PackedInt4, PackedInt8, kernel8_ok, kernel_ok, pack
from layercake.ops.mkl import MKLPacked, packing_available
from layercake.quant import QTensor, QuantSpec, Workspace, dequantize

FORMS = ("dense", "mkl", "bf16", "blocks", "int4pack", "int8row", "dequant")


def choose(
    shape: tuple[int, ...],
    *,
    stored: torch.dtype | None,
    spec: QuantSpec | None,
    device: torch.device | str,
    dtype: torch.dtype,
    streamed: bool = False,
    compiled: bool = False,
    fast: bool = False,
) -> str:
    """The form of a linear weight (out, in).

    ``stored``: the float dtype it is stored in; ``spec``: how it is held quantized (a GGUF
    block type's or the compression's), None for float weights. ``streamed``: the offload
    executor binds it per use from device / RAM / disk rows. ``compiled``: inside a
    ``torch.compile`` graph (plain weights). ``fast``: exactness of the weights is kept but
    activations may be rounded as llama.cpp rounds them (int8 per block of 32)."""
    cpu32 = torch.device(device).type == "cpu" and dtype == torch.float32
    if spec is not None:
        if cpu32 and fast and not streamed and blocks_take(shape, spec, "cpu"):
            return "blocks"
        if cpu32 and kernel_ok(shape, spec, "cpu"):
            return "int4pack"
        if cpu32 and kernel8_ok(shape, spec, "cpu"):
            return "int8row"
        return "dequant"
    bf16 = stored == torch.bfloat16 and cpu32 and kernels.available() and len(shape) == 2
    if streamed:
        return "bf16" if bf16 else "dense"
    if compiled or not cpu32:
        return "dense"
    if bf16 and fast:
        return "bf16"
    return "mkl" if packing_available() else "dense"


@dataclass
class BF16:
    """A weight (out, in) of bf16 rows multiplied as stored (``kernels.bf16_mm``): one tensor,
    or row blocks in order (rows held in different tiers: each multiplies where it lies)."""

    data: torch.Tensor | list[torch.Tensor]
    # many rows (a prompt) where AMX is absent: widen the weight to fp32 a slab of rows at a
    # time into a reused buffer and multiply on MKL, which outruns ``bf16_mm`` there (README);
    # in memory only (the offload path accounts for every buffer it holds)
    widen: bool = False
    form = "bf16"

    @property
    def shape(self) -> tuple[int, int]:
        parts = self.data if isinstance(self.data, list) else [self.data]
        return sum(p.shape[0] for p in parts), parts[0].shape[1]

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # with AMX, ``bf16_linear`` multiplies many rows on the tiles, faster than MKL's fp32
        if x.is_cpu and self.widens(x.numel() // x.shape[-1]):
            return _widened(x, self.data, bias)
        return kernels.bf16_linear(x, self.data, bias)

    def widens(self, rows: int) -> bool:
        """Whether ``linear`` of ``rows`` CPU rows widens the weight for MKL (many rows where
        AMX is absent)."""
        return self.widen and rows >= WIDEN_ROWS and not kernels.amx()

    def linear_into(self, x: torch.Tensor, out: torch.Tensor,
                    bias: torch.Tensor | None = None) -> bool:  # fmt: skip
        """``linear(x)`` written into ``out`` (.., N; unit column stride), the same values, where
        it multiplies on our kernels; False (nothing written) where it would widen."""
        if x.is_cpu and self.widens(x.numel() // x.shape[-1]):
            return False
        kernels.bf16_linear(x, self.data, bias, out=out)
        return True


def bf16_kernel() -> str:
    """How the ``bf16`` form multiplies on this machine (``-v``)."""
    if kernels.amx():
        return (f"AMX tiles from {kernels.AMX_ROWS} rows, fp32 products (activations split "
                f"exactly into 3 bf16 parts); bf16_mm below")  # fmt: skip
    return f"bf16_mm; widened for MKL from {WIDEN_ROWS} rows in memory"


WIDEN_ROWS = 96  # rows of activations from which a bf16 weight is widened for MKL (README)
WIDEN_SLAB = 1 << 23  # fp32 values widened at a time (32 MB, one buffer per thread)
_slabs = threading.local()


def _widened(x: torch.Tensor, w: torch.Tensor | list[torch.Tensor],
             bias: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """``x @ w.T + b`` for bf16 ``w`` (N, K) with many rows of fp32 ``x``: ``w`` widened to fp32
    a slab of rows at a time (``copy_`` into a reused buffer, no allocation per slab), each
    slab multiplied by MKL into its columns of the output. ``w`` may be row blocks in order
    (an offloaded weight's rows in their tiers)."""
    parts = w if isinstance(w, list) else [w]
    N, K = sum(p.shape[0] for p in parts), parts[0].shape[1]
    x2 = x.reshape(-1, K).float()
    buf = getattr(_slabs, "buf", None)
    if buf is None:
        buf = _slabs.buf = torch.empty(WIDEN_SLAB)
    step = max(1, WIDEN_SLAB // K)
    y = x2.new_empty(x2.shape[0], N)
    r0 = 0
    for part in parts:
        for r in range(0, part.shape[0], step):
            n = min(step, part.shape[0] - r)
            slab = buf[: n * K].view(n, K)
            slab.copy_(part[r : r + n])
            b = None if bias is None else bias[r0 + r : r0 + r + n]
            y[:, r0 + r : r0 + r + n] = F.linear(x2, slab, b)
        r0 += part.shape[0]
    return y.view(*x.shape[:-1], N)


class Dequant:
    """A weight held in the quantized row layout, dequantized block by block into a shared
    ``Workspace`` just before each matmul (any device)."""

    form = "dequant"

    def __init__(
        self, rows: torch.Tensor, shape: tuple[int, int], spec: QuantSpec, workspace: Workspace
    ) -> None:
        self.rows, self.shape, self.spec, self.workspace = rows, tuple(shape), spec, workspace
        self.step = max(1, min(shape[0], workspace.buffer.numel() // shape[1]))

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        (N, K), ws = self.shape, self.workspace
        outs = []
        for r in range(0, N, self.step):
            n = min(self.step, N - r)
            t0 = time.perf_counter()
            w = ws.buffer[: n * K].view(n, K)
            dequantize(QTensor.from_rows(self.rows[r : r + n], (n, K), self.spec), w)
            ws.seconds += time.perf_counter() - t0
            ws.calls += 1
            b = None if bias is None else bias[r : r + n]
            outs.append(F.linear(x.to(w.dtype), w, b))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


class Linear(nn.Module):
    """``y = x @ W.T + b`` with W in any form but ``dense`` (held, or bound per use by the
    offload executor: ``weight`` is a plain attribute, ``bias`` a parameter slot)."""

    def __init__(self, weight: object | None, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = weight
        b = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        self.register_parameter("bias", b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight.linear(x, self._parameters["bias"])  # no __getattr__: a hot path

    def extra_repr(self) -> str:
        if self.weight is None:
            return "unbound"
        out, width = self.weight.shape
        return f"in={width}, out={out}, {describe(self.weight)}"


def describe(w: object) -> str:
    form = getattr(w, "form", "dense")
    if isinstance(w, Blocks):
        return f"int{w.bits}-g32 blocks"
    if isinstance(w, PackedInt4):
        return f"int4-g{w.group_size} int4pack"
    if isinstance(w, Dequant):
        return f"{w.spec} dequant"
    return form


def form_of(module: nn.Module) -> str | None:
    """The form of a linear module's weight (None for modules that are not linears)."""
    if isinstance(module, Linear):
        return getattr(module.weight, "form", "dense")
    return "dense" if isinstance(module, nn.Linear) else None


def forms(model: nn.Module) -> Counter:
    """How many linears of ``model`` hold each form (what ``-v`` reports)."""
    return Counter(f for m in model.modules() if (f := form_of(m)) is not None)


def from_float(form: str, source: torch.Tensor, scratch: torch.Tensor | None = None) -> object:
    """A float weight (a view of the checkpoint where it can be) in ``form`` (mkl or bf16)."""
    if form == "mkl":
        return MKLPacked(source, scratch)
    if form == "bf16":
        w = source if source.dtype == torch.bfloat16 else source.to(torch.bfloat16)
        return BF16(w, widen=True)
    raise ValueError(f"no float form {form!r}")


def from_rows(
    form: str,
    rows: torch.Tensor,
    shape: tuple[int, int],
    spec: QuantSpec,
    device: torch.device | str = "cpu",
    workspace: Workspace | None = None,
) -> object:
    """A weight held in the quantized row layout (rows, row bytes) in ``form``."""
    if form == "blocks":
        return Blocks.from_quantized(QTensor.from_rows(rows, shape, spec))
    if form == "int4pack":
        return PackedInt4.from_parts(*pack(QTensor.from_rows(rows, shape, spec)), spec)
    if form == "int8row":
        return PackedInt8.from_rows(rows, spec)
    if form == "dequant":
        return Dequant(rows.to(device), shape, spec, workspace)
    raise ValueError(f"no quantized form {form!r}")

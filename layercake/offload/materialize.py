"""Materialization: a streamed unit's stored bytes (rows on the device, in host RAM, in a disk
staging slot) made into the weights its modules multiply, in the form the ops layer's chooser
(``ops.linear.choose``) picks for each tensor, and bound into the model; and the small tensors
outside the units (embeddings, norms) loaded once.

Per form (``Placed.form``):

- ``dense``: rows in the compute dtype, gathered from their tiers into the compute scratch (or
  the device's rows as they are when all are there); compressed rows dequantized into it
  (``dequant``).
- ``bf16``: bf16 rows multiplied where they lie, one row range per tier (``ops.linear.BF16``).
- ``int8row``: per-row int8 rows moved into the int8 kernel's form in the byte scratch.
- ``int4pack``: the two pieces of PyTorch's int4 form, the values gathered (a view where one
  tier holds them all) and the scales and zeros transposed into the kernel's shape.

A fused weight (``fusion``) is one tensor of the unit, so each of these makes it in one buffer.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from layercake.errors import LayercakeError
from layercake.models.build import embedding_dtype
from layercake.offload.placement import Placed
from layercake.offload.store import Entry, Unit
from layercake.ops import linear as ops
from layercake.ops.int4pack import PackedInt4, PackedInt8
from layercake.quant import QTensor, dequantize

Segments = list[tuple[int, int, torch.Tensor]]  # (first row, end row, raw bytes (rows, bytes))


class Materializer:
    """The materialization half of ``OffloadRunner`` (which sets ``model``, ``units``,
    ``placed``, ``device``, ``dtype``, ``as_stored`` and the scratch buffers)."""

    def form_of(self, e: Entry, u: Unit) -> str:
        """The form entry ``e`` of unit ``u`` is materialized in, as the chooser picks it for a
        streamed weight (vectors and weights the forms do not take: ``dense``)."""
        if e.piece:  # planned so because the chooser picked int4pack (``store.plan_units``)
            return "int4pack"
        if len(e.shape) != 2:
            return "dense"
        if e.quant:
            form = ops.choose(e.shape, stored=None, spec=e.spec, device=self.device,
                              dtype=self.dtype, streamed=True)  # fmt: skip
            return "int8row" if form == "int8row" else "dequant"
        if not self.as_stored or not (u.kind == "head" or self._linear_weight(e)):
            return "dense"
        return ops.choose(e.shape, stored=e.torch_dtype, spec=None, device=self.device,
                          dtype=self.dtype, streamed=True)  # fmt: skip

    def _linear_weight(self, e: Entry) -> bool:
        owner = self.model.get_submodule(e.param.rpartition(".")[0])
        return e.param.endswith(".weight") and type(owner) in (nn.Linear, ops.Linear)

    def bind_forms(self) -> None:
        """Layer linears whose weight takes a form other than a dense tensor become
        ``ops.linear.Linear``s, their weight bound per unit (the head's slabs are multiplied
        by the executor)."""
        for u in self.units:
            if u.kind == "head":
                continue
            for e in u.entries:
                if e.piece == "sz" or self.form_of(e, u) in ("dense", "dequant"):
                    continue
                parent, _, child = e.param.rpartition(".")[0].rpartition(".")
                setattr(self.model.get_submodule(parent), child, ops.Linear(None))

    def bind_static(self, ckpt: Any) -> None:
        """Embeddings, final norm and other small non-layer tensors stay resident; a table
        stored narrower than the compute dtype stays a view of the checkpoint (rows upcast)."""
        names = set(ckpt.tensor_names())
        unit_params = {e.param for u in self.units for e in u.entries}
        state = {}
        for name in dict(self.model.named_parameters()):
            if name in unit_params or name == "lm_head.weight":
                continue
            src = self.model.source_name(name, names)
            if src not in names:
                raise LayercakeError(f"checkpoint has no tensor {name!r}")
            owner = self.model.get_submodule(name.rpartition(".")[0])
            want = self.dtype
            if isinstance(owner, nn.Embedding):
                want = embedding_dtype(ckpt, src, self.dtype, self.device)
                if want != self.dtype:
                    owner.compute_dtype = self.dtype
            state[name] = ckpt.load(src, want).to(self.device)
        self.model.load_state_dict(state, assign=True, strict=False)
        self.model.requires_grad_(False)

    def materialize(self, j: int, staging: torch.Tensor | None) -> dict[str, object]:
        """Unit j's weights in their forms on the device, bound into the model; returned by
        parameter name (a tensor for ``dense``, else the form's object)."""
        out: dict[str, object] = {}
        start = self.disk_ranges[j][0] if staging is not None else 0
        values = None  # the int4pack values piece, until its scales and zeros come
        for p in self.placed[j]:
            e = p.entry
            if p.form == "int4pack" and e.piece == "data":
                values = self._int4pack_piece(p, staging, start)
                continue
            if p.form == "int4pack":
                n, k = e.weight_shape
                sz = self._int4pack_piece(p, staging, start)
                w = PackedInt4(values.view(n, k // 2), sz, e.spec.group_size)
            elif p.form == "bf16":  # one tensor per tier, never copied; a prompt's many rows
                # widen it a slab at a time for MKL (the slab is ``footprint``'s scratch)
                parts = [raw.view(e.torch_dtype) for _, _, raw in self._segments(p, staging, start)]
                w = ops.BF16(parts[0] if len(parts) == 1 else parts, widen=not self.cuda)
            elif p.form == "int8row":
                w = self._int8row(p, staging, start)
            elif p.form == "dequant":
                w = self._dequantize(p, staging, start)
            else:
                w = self._dense(p, staging, start)
            if p.owner is not None and isinstance(w, torch.Tensor):
                p.owner._parameters[p.attr] = w
            elif p.owner is not None:
                p.owner.weight = w
            out[e.param.removesuffix("#sz")] = w
        if any(p.entry.quant for p in self.placed[j]):  # the int4pack transposes included
            self.dequant_units += 1
        return out

    def _segments(self, p: Placed, staging: torch.Tensor | None, start: int) -> Segments:
        """A tensor's rows per tier: (first row, end row, raw bytes (rows, row_bytes))."""
        e, n, rb = p.entry, p.entry.shape[0], p.entry.row_bytes
        lo = e.offset + p.b * rb - start
        disk = staging[lo : lo + (n - p.b) * rb].view(n - p.b, rb) if n > p.b else None
        tiers = ((0, p.a, p.dev), (p.a, p.b, p.cpu), (p.b, n, disk))
        return [
            (r0, r1, raw.view(r1 - r0, -1).view(torch.uint8)) for r0, r1, raw in tiers if r1 > r0
        ]

    def _dense(self, p: Placed, staging: torch.Tensor | None, start: int) -> torch.Tensor:
        """Rows in the compute dtype: the device's as they are when all are there, else each
        tier's converted into the tensor's place in the compute scratch."""
        if p.scratch is None:
            return p.dev
        e, n = p.entry, p.entry.shape[0]
        off, numel = p.scratch
        t = self.scratch[off : off + numel].view(e.shape)
        if p.a:
            t[: p.a].copy_(p.dev)
        if p.b > p.a:
            t[p.a : p.b].copy_(p.cpu, non_blocking=True)
        if n > p.b:
            lo = e.offset + p.b * e.row_bytes - start
            raw = staging[lo : lo + (n - p.b) * e.row_bytes]
            t[p.b :].copy_(raw.view(e.torch_dtype).view(n - p.b, *e.shape[1:]),
                           non_blocking=True)  # fmt: skip
        return t

    def _int8row(self, p: Placed, staging: torch.Tensor | None, start: int) -> PackedInt8:
        """Per-row int8 rows moved into the int8 kernel's form in the byte scratch."""
        t0 = time.perf_counter()
        off, nbytes = p.byte_scratch
        w = PackedInt8.empty(*p.entry.shape, self.byte_scratch[off : off + nbytes])
        for r0, _, raw in self._segments(p, staging, start):
            w.fill(r0, raw)
        self.dequant_s += time.perf_counter() - t0
        return w

    def _int4pack_piece(self, p: Placed, staging: torch.Tensor | None, start: int) -> torch.Tensor:
        """An int4pack piece in the kernel's shape: the values gathered (a view where one tier
        holds them all), the scales and zeros transposed into (groups, out, 2)."""
        t0 = time.perf_counter()
        e = p.entry
        segs = self._segments(p, staging, start)
        if p.byte_scratch is None:  # the values, all in one tier
            return segs[0][2]
        off, nbytes = p.byte_scratch
        buf = self.byte_scratch[off : off + nbytes]
        if e.piece == "data":
            t = buf.view(e.shape[0], -1)
            for r0, r1, raw in segs:
                t[r0:r1].copy_(raw)
        else:
            t = buf.view(e.torch_dtype).view(e.shape[1] // 2, e.shape[0], 2)
            for r0, r1, raw in segs:
                t[:, r0:r1].copy_(raw.view(e.torch_dtype).view(r1 - r0, -1, 2).transpose(0, 1))
        self.dequant_s += time.perf_counter() - t0
        return t

    def _dequantize(self, p: Placed, staging: torch.Tensor | None, start: int) -> torch.Tensor:
        """A compressed tensor's rows from each tier, dequantized into its compute scratch."""
        t0 = time.perf_counter()
        e = p.entry
        off, numel = p.scratch
        t = self.scratch[off : off + numel].view(e.shape)
        for r0, r1, raw in self._segments(p, staging, start):
            if raw.device != self.device:
                raw = self.raw_dev[: raw.numel()].view(raw.shape).copy_(raw, non_blocking=True)
            dequantize(QTensor.from_rows(raw, (r1 - r0, *e.shape[1:]), e.spec), t[r0:r1])
        self.dequant_s += time.perf_counter() - t0
        return t

"""Where the offload executor's weights lie: which rows of each tensor of a unit are on the
device, in host RAM or on disk (the policy's byte shares, unit by unit), the scratch buffers
they are materialized into (``materialize``) and the disk loader."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layercake.errors import LayercakeError
from layercake.offload.experts import resident_bytes
from layercake.offload.loader import Loader
from layercake.offload.policy import STAGING_SLOTS, expert_slots, split_bytes
from layercake.offload.store import Entry, Unit, disk_range, entry_rows, int4pack_piece, prepare
from layercake.offload.tiers import ALIGN, DirectReader, align_up, host_buffer, keep_in_ram
from layercake.ops.int4pack import nbytes8


@dataclass
class Placed:
    """One tensor of a unit: rows [0, a) on the device, [a, b) in host RAM, [b, n) on disk."""

    entry: Entry
    a: int
    b: int
    dev: torch.Tensor | None  # rows [0, a), compute dtype (as stored: bf16, quantized, pieces)
    cpu: torch.Tensor | None  # rows [a, b), storage dtype
    scratch: tuple[int, int] | None  # (offset, numel) in the compute scratch
    byte_scratch: tuple[int, int] | None  # (offset, nbytes) in the byte scratch
    owner: nn.Module | None
    attr: str
    form: str = "dense"  # the form it is materialized in (``materialize``)


class Placement:
    """The placement half of ``OffloadRunner`` (which sets ``model``, ``units``, ``policy``,
    ``device``, ``dtype``, ``cuda`` and ``offload_dir``, and gives each entry's form:
    ``form_of``)."""

    def _place_weights(self, ckpt: Any, source: Path) -> None:
        """Place every unit's rows, size the scratch buffers they are materialized into and
        open the disk loader."""
        self.moe_split = resident_bytes(self.units, self.policy.w_device, self.policy.w_cpu)
        self.placed = [self._place(ckpt, u) for u in self.units]
        _experts_after_their_layer(self.units, self.placed)
        need = max((sum(p.scratch) for ps in self.placed for p in ps if p.scratch), default=0)
        self.scratch = torch.empty(need, dtype=self.dtype, device=self.device)
        need = max(
            (sum(p.byte_scratch) for ps in self.placed for p in ps if p.byte_scratch), default=0
        )
        self.byte_scratch = torch.empty(need, dtype=torch.uint8)
        # CUDA: compressed rows from host RAM or staging are copied here, then dequantized
        raw = [
            p.entry.nbytes
            for ps in self.placed
            for p in ps
            if p.entry.quant and not p.entry.piece and p.a < p.entry.shape[0]
        ]
        raw_bytes = max(raw, default=0) if self.cuda else 0
        self.raw_dev = torch.empty(raw_bytes, dtype=torch.uint8, device=self.device)
        self.loader = self._disk(ckpt, source)

    def _place(self, ckpt: Any, u: Unit) -> list[Placed]:
        dev_b, cpu_b, _ = split_bytes(u.nbytes, self.policy.w_device, self.policy.w_cpu)
        if self.moe_split is not None:  # routed experts: ``experts.resident_bytes``
            dev_b, cpu_b = self.moe_split[self.units.index(u)]
        out, done, offset, boffset = [], 0, 0, 0
        for e in u.entries:
            n, rb = e.shape[0], e.row_bytes
            a = min(n, max(0, (dev_b - done) // rb))
            b = min(n, a + max(0, (dev_b + cpu_b - done - a * rb) // rb))
            done += e.nbytes
            if b == 0:  # all on disk: nothing to read here (a fused expert would be read whole)
                rows, mapped = None, False
            elif e.piece:  # a piece of the int4pack form, made from the row layout once
                rows, mapped = int4pack_piece(ckpt, e), False
            else:  # only the rows kept here are read
                rows = entry_rows(ckpt, e, b)
                # a view of the checkpoint's map when stored so: kept as it is, never copied;
                # else (dequantized, fused, or compressed: in every tier, the device's
                # included) owned memory, of which only the rows kept here are held
                as_file = ckpt.stored_dtype(e.src) == e.torch_dtype
                mapped = as_file and not e.quant and not e.members
            dev = cpu = None
            form = self.form_of(e, u)
            if a:
                dt = self.dtype if form == "dense" else e.torch_dtype
                dev = rows[:a].to(self.device, dt)
                if dev.data_ptr() == rows.data_ptr() and not mapped and a < n:
                    dev = dev.clone()
            if b > a:
                if mapped:
                    cpu = keep_in_ram(rows[a:b])
                else:  # owned (dequantized, quantized or fused here): only the rows kept
                    # are held (compressed or fused ``rows`` are exactly the first b)
                    cpu = rows[a:b] if (e.quant or e.members) and a == 0 else rows[a:b].clone()
                if self.cuda:
                    cpu = cpu.pin_memory()
            if e.members:  # the rows kept are copies: the members' pages read may go
                for src in e.sources:
                    ckpt.release(src)
            owner, attr = None, e.param.rpartition(".")[2]
            if u.kind in ("layer", "expert"):
                owner = self.model.get_submodule(e.param.rpartition(".")[0])
            scratch = byte_scratch = None
            tiers = (a > 0) + (b > a) + (n > b)
            if e.piece == "sz" or (e.piece == "data" and tiers > 1):  # gathered or transposed
                byte_scratch = (boffset, e.nbytes)
                boffset += align_up(e.nbytes)
            elif form == "int8row":  # values moved to int8, scales and offsets: the kernel's
                byte_scratch = (boffset, nbytes8(*e.shape))
                boffset += align_up(byte_scratch[1])
            elif form == "dequant" or (form == "dense" and a < n):
                scratch = (offset, e.numel)
                offset += e.numel
            out.append(Placed(e, a, b, dev, cpu, scratch, byte_scratch, owner, attr, form))
        return out

    def _disk(self, ckpt: Any, source: Path) -> Loader | None:
        first_rows = [{p.entry.param: p.b for p in ps} for ps in self.placed]
        ranges = {j: disk_range(u, first_rows[j]) for j, u in enumerate(self.units)}
        ranges = {j: r for j, r in ranges.items() if r[1] > 0}
        self.disk_bytes = sum(r[1] for r in ranges.values())
        self.expert_loader = None
        if not ranges:
            return None
        if self.offload_dir is None:
            raise LayercakeError(
                "the policy puts weights on disk: give an offload dir (--offload-dir, offload_dir=)"
            )
        directory = prepare(ckpt, self.units, source, self.offload_dir)
        self.disk_ranges = ranges
        readers = {j: DirectReader(directory / f"{self.units[j].name}.bin") for j in ranges}
        for j, u in enumerate(self.units):  # every expert: rebalancing may move it to disk
            if u.kind == "expert" and j not in readers:
                readers[j] = DirectReader(directory / f"{u.name}.bin")
        experts = {j: r for j, r in ranges.items() if self.units[j].kind == "expert"}
        # routed experts are read after their router ran, inside their layer's compute: a ring
        # of their own, so that they never wait for the layers' read-ahead
        if experts:
            slots = expert_slots(max(self.units[j].nbytes for j in experts))
            self.expert_loader = _loader(readers, experts, self.cuda, slots)
        return _loader(readers, {j: r for j, r in ranges.items() if j not in experts}, self.cuda)


def _loader(readers: dict, ranges: dict[int, tuple[int, int]], pin: bool,
            slots: int = STAGING_SLOTS) -> Loader | None:  # fmt: skip
    if not ranges:
        return None
    size = max(r[1] for r in ranges.values()) + ALIGN
    slots = [host_buffer(size, pin=pin) for _ in range(slots)]
    return Loader(readers, ranges, slots)


def _experts_after_their_layer(units: list[Unit], placed: list[list[Placed]]) -> None:
    """Routed experts are materialized while their layer's other weights are still in use
    (a shared expert runs after them): their scratch lies after the largest layer's."""
    others = [ps for u, ps in zip(units, placed) if u.kind != "expert"]
    base = max((p.scratch[0] + p.scratch[1] for ps in others for p in ps if p.scratch), default=0)
    bbase = max((p.byte_scratch[0] + align_up(p.byte_scratch[1]) for ps in others for p in ps
                 if p.byte_scratch), default=0)  # fmt: skip
    for u, ps in zip(units, placed):
        if u.kind != "expert":
            continue
        for p in ps:
            if p.scratch:
                p.scratch = (p.scratch[0] + base, p.scratch[1])
            if p.byte_scratch:
                p.byte_scratch = (p.byte_scratch[0] + bbase, p.byte_scratch[1])

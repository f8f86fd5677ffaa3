"""Where the offload executor's weights lie: which rows of each tensor of a unit are on the
device, in host RAM or on disk (the policy's byte shares, unit by unit), the small tensors
outside the units bound resident, the conversion scratch buffers and the disk loader."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layercake.checkpoint.quantized import load_rows
from layercake.errors import LayercakeError
from layercake.models.build import embedding_dtype
from layercake.offload.loader import Loader
from layercake.offload.policy import STAGING_SLOTS, split_bytes
from layercake.offload.store import Entry, Unit, disk_range, packed_part, prepare
from layercake.offload.tiers import ALIGN, DirectReader, align_up, host_buffer, keep_in_ram
from layercake.ops.int4pack import nbytes8


@dataclass
class Placed:
    """One tensor of a unit: rows [0, a) on the device, [a, b) in host RAM, [b, n) on disk."""

    entry: Entry
    a: int
    b: int
    dev: torch.Tensor | None  # rows [0, a), compute dtype
    cpu: torch.Tensor | None  # rows [a, b), storage dtype
    scratch: tuple[int, int] | None  # (offset, numel) in the compute scratch, None = direct
    pscratch: tuple[int, int] | None  # a packed part's (offset, nbytes) in the byte scratch
    owner: nn.Module | None
    attr: str
    direct: bool = False  # bf16 rows multiplied as they lie (``kernels.bf16_mm``), never copied


class Placement:
    """The placement half of ``OffloadRunner`` (which sets ``model``, ``units``, ``policy``,
    ``device``, ``dtype``, ``cuda`` and ``offload_dir``, and says which weights multiply as
    stored (``_direct``) or on the int8 kernel (``_int8``))."""

    def _place_weights(self, ckpt: Any, source: Path) -> None:
        """Bind the static tensors, place every unit's rows, size the scratch buffers they
        convert into and open the disk loader."""
        self._bind_static(ckpt)
        self.placed = [self._place(ckpt, u) for u in self.units]
        need = max((sum(p.scratch[1] for p in ps if p.scratch) for ps in self.placed), default=0)
        self.scratch = torch.empty(need, dtype=self.dtype, device=self.device)
        need = max((sum(p.pscratch) for ps in self.placed for p in ps if p.pscratch), default=0)
        self.pscratch = torch.empty(need, dtype=torch.uint8)
        # CUDA: compressed rows from host RAM or staging are copied here, then dequantized
        raw = [
            p.entry.nbytes
            for ps in self.placed
            for p in ps
            if p.entry.quant and not p.entry.form and p.a < p.entry.shape[0]
        ]
        raw_bytes = max(raw, default=0) if self.cuda else 0
        self.raw_dev = torch.empty(raw_bytes, dtype=torch.uint8, device=self.device)
        self.loader = self._disk(ckpt, source)

    def _bind_static(self, ckpt: Any) -> None:
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

    def _place(self, ckpt: Any, u: Unit) -> list[Placed]:
        dev_b, cpu_b, _ = split_bytes(u.nbytes, self.policy.w_device, self.policy.w_cpu)
        out, done, offset, poffset = [], 0, 0, 0
        for e in u.entries:
            n, rb = e.shape[0], e.row_bytes
            a = min(n, max(0, (dev_b - done) // rb))
            b = min(n, a + max(0, (dev_b + cpu_b - done - a * rb) // rb))
            done += e.nbytes
            if e.form:  # a part of the packed form, made from the row layout once
                rows, mapped = packed_part(ckpt, e), False
            elif e.quant:  # compressed in every tier, the device's included; owned memory
                rows, mapped = load_rows(ckpt, e.src, e.quant, e.row0, n), False
            else:
                rows = ckpt.load(e.src, e.torch_dtype)[e.row0 : e.row0 + n]
                # a view of the checkpoint's map when stored so: kept as it is, never copied;
                # else (dequantized) only the rows kept here are held
                mapped = ckpt.stored_dtype(e.src) == e.torch_dtype
            dev = cpu = None
            direct = self._direct(e, u)
            if a:
                dt = e.torch_dtype if e.form or direct else torch.uint8 if e.quant else self.dtype
                dev = rows[:a].to(self.device, dt)
                if dev.data_ptr() == rows.data_ptr() and not mapped and a < n:
                    dev = dev.clone()
            if b > a:
                if mapped:
                    cpu = keep_in_ram(rows[a:b])
                else:  # owned (dequantized or quantized here): only the rows kept are held
                    cpu = rows[a:b] if e.quant and a == 0 and b == n else rows[a:b].clone()
                if self.cuda:
                    cpu = cpu.pin_memory()
            owner, attr = None, e.param.rpartition(".")[2]
            if u.kind == "layer":
                owner = self.model.get_submodule(e.param.rpartition(".")[0])
            scratch = pscratch = None
            tiers = (a > 0) + (b > a) + (n > b)
            if e.form == "sz" or (e.form == "data" and tiers > 1):  # gathered or transposed
                pscratch = (poffset, e.nbytes)
                poffset += align_up(e.nbytes)
            elif self._int8(e):  # values moved to int8, scales and offsets: the int8 kernel's
                pscratch = (poffset, nbytes8(*e.shape))
                poffset += align_up(pscratch[1])
            elif not e.form and not direct and (a < n or e.quant):
                scratch = (offset, e.numel)
                offset += e.numel
            out.append(Placed(e, a, b, dev, cpu, scratch, pscratch, owner, attr, direct))
        return out

    def _disk(self, ckpt: Any, source: Path) -> Loader | None:
        first_rows = [{p.entry.param: p.b for p in ps} for ps in self.placed]
        ranges = {j: disk_range(u, first_rows[j]) for j, u in enumerate(self.units)}
        ranges = {j: r for j, r in ranges.items() if r[1] > 0}
        self.disk_bytes = sum(r[1] for r in ranges.values())
        if not ranges:
            return None
        if self.offload_dir is None:
            raise LayercakeError(
                "the policy puts weights on disk: give an offload dir (--offload-dir, offload_dir=)"
            )
        directory = prepare(ckpt, self.units, source, self.offload_dir)
        self.disk_ranges = ranges
        readers = {j: DirectReader(directory / f"{self.units[j].name}.bin") for j in ranges}
        size = max(r[1] for r in ranges.values()) + ALIGN
        slots = [host_buffer(size, pin=self.cuda) for _ in range(STAGING_SLOTS)]
        return Loader(readers, ranges, slots)

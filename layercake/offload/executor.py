"""The offload executor: runs a model whose weights, KV cache and activations are spread over
device, host RAM and disk, following the zig-zag schedule, with disk reads in a background thread.

It wraps the family's own model (built on the meta device) and never forks its math: per unit it
binds the unit's weights into the model's modules and calls the same blocks ``LocalRunner`` runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from layercake.checkpoint.parts import Parts
from layercake.checkpoint.quantized import load_rows
from layercake.config import BaseConfig
from layercake.errors import LayercakeError
from layercake.kv_cache import AttentionStep, KVCache, QuantKV
from layercake.models import family
from layercake.models.build import embedding_dtype
from layercake.offload.cuda import DeviceKV, WeightStream, to_device_rows, to_host_rows
from layercake.offload.kvdisk import DiskKV, KVStream
from layercake.offload.kvtiers import KVTiers
from layercake.offload.loader import Loader
from layercake.offload.policy import STAGING_SLOTS, Policy, split_bytes
from layercake.offload.schedule import zigzag
from layercake.offload.store import Entry, Unit, disk_range, packed_part, plan_units, prepare
from layercake.offload.tiers import (
    ALIGN,
    DirectReader,
    advise_willneed,
    align_up,
    file_tensor,
    host_buffer,
    keep_in_ram,
)
from layercake.ops import kernels
from layercake.ops import linear as ops
from layercake.ops.int4pack import PackedInt4, PackedInt8, nbytes8
from layercake.ops.kernels import bf16_linear
from layercake.quant import Compression, QTensor, dequantize


@dataclass
class _Placed:
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


@dataclass
class _Pass:
    """The state of one forward pass through the schedule."""

    cache: KVCache
    step: AttentionStep
    rows: list[slice]  # micro-batches
    hs: list[torch.Tensor]  # hidden states per micro-batch
    ctxs: list[Any]
    steps: list[AttentionStep]
    on_disk: set[int]  # micro-batches whose activations live in the file ``act``
    act: torch.Tensor | None
    normed: list[torch.Tensor | None]
    logits: list[torch.Tensor | None]
    last_only: bool
    mapped_kv: set[int]  # layers whose cache is a map of a file (compressed cache on disk)
    streamed: dict[tuple[int, int], tuple]  # (layer, micro-batch) -> direct I/O of its cache
    cpu_steps: list[AttentionStep]  # CUDA: the steps with their masks in host memory
    copied: dict[int, Any] = field(default_factory=dict)  # unit -> CUDA event after its copies


class OffloadRunner:
    """A Runner (``new_cache`` / ``forward``) for a model placed by a ``Policy``."""

    def __init__(
        self,
        ckpt: Any,
        config: BaseConfig,
        source: Path,
        parts: Parts,
        policy: Policy,
        device: torch.device,
        dtype: torch.dtype,
        offload_dir: Path | None,
        kv_budget: int | None = None,
        compress: Compression | None = None,
        cpu_cache_compute: bool = False,
    ) -> None:
        self.config, self.parts, self.policy = config, parts, policy
        self.compress = compress
        self.cache_quant = compress.cache_spec(config.head_dim) if compress else None
        self.dequant_s, self.dequant_units = 0.0, 0  # time spent dequantizing weights
        self.device, self.dtype = device, dtype
        self.vocab_size = config.vocab_size
        self.max_context = config.max_position_embeddings
        self.layers = list(parts.layers)
        self.offload_dir = offload_dir
        self.kv_budget = kv_budget
        self.cuda = device.type == "cuda"
        fam = family(config.model_type)
        with torch.device("meta"):
            self.model = fam.Model(config, parts)
        self.units = plan_units(
            ckpt, self.model, parts.layers, parts.head, fam.Model.tied, dtype, compress,
            packed=device.type == "cpu" and dtype == torch.float32,
        )  # fmt: skip
        # streamed bf16 weights multiply as stored (all resident ones are held in fp32 instead)
        self.direct = (
            device.type == "cpu"
            and dtype == torch.float32
            and policy.w_device < 100
            and kernels.available()
        )
        self._packed_modules()
        self._bind_static(ckpt, fam.Model.tied)
        if parts.head:
            self.model.lm_head = nn.Identity()  # the head's projection runs as streamed slabs
        self.placed = [self._place(ckpt, u) for u in self.units]
        need = max((sum(p.scratch[1] for p in ps if p.scratch) for ps in self.placed), default=0)
        self.scratch = torch.empty(need, dtype=dtype, device=device)
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
        self.raw_dev = torch.empty(raw_bytes, dtype=torch.uint8, device=device)
        self.loader = self._disk(ckpt, source)
        self.block_size = policy.block_size
        self.act_files: dict[tuple[int, ...], torch.Tensor] = {}
        self.kv = KVTiers(config, self.layers, policy, device, dtype, offload_dir, kv_budget,
                          self.cache_quant)  # fmt: skip
        self.kv_stream = KVStream(pin=self.cuda)
        self.cpu_cache_compute = cpu_cache_compute
        self.wstream: WeightStream | None = None
        if self.cuda:  # side streams: weights double-buffered, KV rows through a device ring
            self.wstream = WeightStream(device, self.scratch)
            self.dev_kv = DeviceKV(device, torch.cuda.Stream(device))
        # where a pass spends its time: blocked on weight reads, converting weights to the
        # compute dtype, blocked on KV cache reads, and in total
        self.times = dict.fromkeys(("weights_wait_s", "materialize_s", "kv_wait_s", "forward_s"),
                                   0.0)  # fmt: skip

    # ---- placement -------------------------------------------------------------------------
    def _int8(self, e: Entry) -> bool:
        """Whether ``e`` multiplies on the int8 kernel (per-row int8, e.g. an int4 model's head)."""
        return bool(e.quant) and not e.form and self._form(e, e.spec) == "int8row"

    def _direct(self, e: Entry, u: Unit) -> bool:
        """Whether ``e`` is multiplied in bf16 as stored: a linear weight or a head slab."""
        if not self.direct or e.quant or e.form or self._form(e, None) != "bf16":
            return False
        if u.kind == "head":
            return True
        owner = self.model.get_submodule(e.param.rpartition(".")[0])
        return e.param.endswith(".weight") and type(owner) in (nn.Linear, ops.Linear)

    def _form(self, e: Entry, spec: object) -> str:
        """The form the chooser picks for a streamed weight entry."""
        stored = None if e.quant else e.torch_dtype
        shape = e.weight_shape if e.form else e.shape
        return ops.choose(shape, stored=stored, spec=spec, device=self.device, dtype=self.dtype,
                          streamed=True)  # fmt: skip

    def _packed_modules(self) -> None:
        """Linears whose weight is held in the int4 kernel's form become ``Int4Linear``s, those
        multiplied in bf16 ``BF16Linear``s (their weight bound per unit); the head's slabs are
        multiplied in ``forward``."""
        for u in self.units:
            for e in u.entries:
                if u.kind != "layer":
                    continue
                if e.form == "data" or self._int8(e) or self._direct(e, u):
                    module = ops.Linear(None)
                else:
                    continue
                name = e.param.rpartition(".")[0]
                parent, _, child = name.rpartition(".")
                setattr(self.model.get_submodule(parent), child, module)

    def _bind_static(self, ckpt: Any, tied: dict[str, str]) -> None:
        """Embeddings, final norm and other small non-layer tensors stay resident; a table
        stored narrower than the compute dtype stays a view of the checkpoint (rows upcast)."""
        names = set(ckpt.tensor_names())
        unit_params = {e.param for u in self.units for e in u.entries}
        state = {}
        for name in dict(self.model.named_parameters()):
            if name in unit_params or name == "lm_head.weight":
                continue
            src = name if name in names else tied.get(name, name)
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

    def _place(self, ckpt: Any, u: Unit) -> list[_Placed]:
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
            out.append(_Placed(e, a, b, dev, cpu, scratch, pscratch, owner, attr, direct))
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

    # ---- KV cache and activations ----------------------------------------------------------
    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """The cache of held layers in their tiers (see ``KVTiers.new_cache``)."""
        return self.kv.new_cache(batch, capacity)

    @property
    def kv_on_disk(self) -> int:  # layers of the latest cache on disk
        return self.kv.on_disk

    @property
    def kv_files(self) -> list[dict[int, tuple[DiskKV, DiskKV]]]:
        return self.kv.files

    def _act_buffer(self, shape: tuple[int, ...]) -> torch.Tensor:
        if shape not in self.act_files:
            self.act_files.clear()
            d = self.offload_dir / "act"
            self.act_files[shape] = file_tensor(d / f"{len(self.act_files)}", shape, self.dtype)
        return self.act_files[shape]

    # ---- execution -------------------------------------------------------------------------
    def _materialize(self, j: int, staging: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Unit j's weights in the compute dtype on the device, bound into the model."""
        out = {}
        disk_start = self.disk_ranges[j][0] if staging is not None else 0
        data = None
        for p in self.placed[j]:
            e, n = p.entry, p.entry.shape[0]
            if e.form == "data":
                data = self._packed_part(p, staging, disk_start)
                continue
            if e.form == "sz":
                shape = e.weight_shape
                sz = self._packed_part(p, staging, disk_start)
                t = PackedInt4(data.view(shape[0], shape[1] // 2), sz, e.spec.group_size)
                if p.owner is not None:
                    p.owner.weight = t
                out[e.param.removesuffix("#sz")] = t
                continue
            if p.direct:  # bf16 rows where they lie: one tensor per tier
                segs = self._segments(p, staging, disk_start)
                parts = [raw.view(e.torch_dtype).view(r1 - r0, -1) for r0, r1, raw in segs]
                t = parts[0] if len(parts) == 1 else parts
                if p.owner is not None:
                    p.owner.weight = ops.BF16(t)
                out[e.param] = t
                continue
            if p.pscratch is not None:  # per-row int8
                t0 = time.perf_counter()
                off, nbytes = p.pscratch
                t = PackedInt8.empty(*e.shape, self.pscratch[off : off + nbytes])
                for r0, _, raw in self._segments(p, staging, disk_start):
                    t.fill(r0, raw)
                self.dequant_s += time.perf_counter() - t0
                if p.owner is not None:
                    p.owner.weight = t
                out[e.param] = t
                continue
            if p.scratch is None:
                t = p.dev
            elif e.quant:
                t = self._dequantize(p, staging, disk_start)
            else:
                off, numel = p.scratch
                t = self.scratch[off : off + numel].view(e.shape)
                if p.a:
                    t[: p.a].copy_(p.dev)
                if p.b > p.a:
                    t[p.a : p.b].copy_(p.cpu, non_blocking=True)
                if n > p.b:
                    lo = e.offset + p.b * e.row_bytes - disk_start
                    raw = staging[lo : lo + (n - p.b) * e.row_bytes]
                    t[p.b :].copy_(raw.view(e.torch_dtype).view(n - p.b, *e.shape[1:]),
                                   non_blocking=True)  # fmt: skip
            if p.owner is not None:
                p.owner._parameters[p.attr] = t
            out[e.param] = t
        if any(p.entry.quant for p in self.placed[j]):  # the packed parts' transposes included
            self.dequant_units += 1
        return out

    def _segments(
        self, p: _Placed, staging: torch.Tensor | None, disk_start: int
    ) -> list[tuple[int, int, torch.Tensor]]:
        """A tensor's rows per tier: (first row, end row, raw bytes (rows, row_bytes))."""
        e, n, rb = p.entry, p.entry.shape[0], p.entry.row_bytes
        lo = e.offset + p.b * rb - disk_start
        disk = staging[lo : lo + (n - p.b) * rb].view(n - p.b, rb) if n > p.b else None
        tiers = ((0, p.a, p.dev), (p.a, p.b, p.cpu), (p.b, n, disk))
        return [
            (r0, r1, raw.view(r1 - r0, -1).view(torch.uint8)) for r0, r1, raw in tiers if r1 > r0
        ]

    def _packed_part(
        self, p: _Placed, staging: torch.Tensor | None, disk_start: int
    ) -> torch.Tensor:
        """A packed part in the kernel's shape: the values gathered (a view where one tier holds
        them all), the scales and zeros transposed into (groups, out, 2)."""
        t0 = time.perf_counter()
        e = p.entry
        segs = self._segments(p, staging, disk_start)
        if p.pscratch is None:  # the values, all in one tier
            return segs[0][2]
        off, nbytes = p.pscratch
        buf = self.pscratch[off : off + nbytes]
        if e.form == "data":
            t = buf.view(e.shape[0], -1)
            for r0, r1, raw in segs:
                t[r0:r1].copy_(raw)
        else:
            t = buf.view(e.torch_dtype).view(e.shape[1] // 2, e.shape[0], 2)
            for r0, r1, raw in segs:
                t[:, r0:r1].copy_(raw.view(e.torch_dtype).view(r1 - r0, -1, 2).transpose(0, 1))
        self.dequant_s += time.perf_counter() - t0
        return t

    def _dequantize(
        self, p: _Placed, staging: torch.Tensor | None, disk_start: int
    ) -> torch.Tensor:
        """A compressed tensor's rows from each tier, dequantized into its scratch."""
        t0 = time.perf_counter()
        e = p.entry
        off, numel = p.scratch
        t = self.scratch[off : off + numel].view(e.shape)
        for r0, r1, raw in self._segments(p, staging, disk_start):
            if raw.device != self.device:
                raw = self.raw_dev[: raw.numel()].view(raw.shape).copy_(raw, non_blocking=True)
            dequantize(QTensor.from_rows(raw, (r1 - r0, *e.shape[1:]), e.spec), t[r0:r1])
        self.dequant_s += time.perf_counter() - t0
        return t

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,  # (B, T) ids, or (B, T, hidden) for a slice without embeddings
        positions: torch.Tensor,  # (B, T)
        cache: KVCache,
        token_mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        tokens, positions = tokens.to(self.device), positions.to(self.device)
        B, T = positions.shape
        if token_mask is None:
            token_mask = torch.ones(B, T, dtype=torch.bool)
        step = cache.begin(token_mask.to(self.device))
        bs = self.micro_rows(T, cache.capacity)
        rows = [slice(a, min(a + bs, B)) for a in range(0, B, bs)]
        m = self.model
        hs = [m.embed(tokens[r], positions[r]) if self.parts.embed else tokens[r] for r in rows]
        on_disk = self._act_on_disk(len(rows))
        s = _Pass(
            cache=cache,
            step=step,
            rows=rows,
            hs=hs,
            ctxs=[m.context(positions[r], hs[0].dtype) for r in rows],
            steps=[AttentionStep(step.start, step.end, step.mask[r]) for r in rows],
            on_disk=on_disk,
            act=self._act_buffer((B, T, hs[0].shape[-1])) if on_disk else None,
            normed=[None] * len(rows),
            logits=[None] * len(rows),
            last_only=last_only,
            mapped_kv=set(self.layers[len(self.layers) - self.kv.on_disk :]),
            streamed=self.kv.streamed(cache, rows),
            cpu_steps=[AttentionStep(step.start, step.end, step.mask[r].cpu()) for r in rows]
            if self.cuda
            else [],
        )
        t0 = time.perf_counter()
        try:
            self._run_ops(s)
        finally:
            self.kv_stream.drain()  # this step's new slots are on disk before anyone reads them
            self.kv_stream.abandon()
            if self.cuda:  # and those of host RAM layers are back in host memory
                self.dev_kv.finish()
        self.times["forward_s"] += time.perf_counter() - t0
        cache.advance(step)
        if not self.parts.head:
            hs = [h.to(self.device) for h in hs]
            return torch.cat(hs) if len(hs) > 1 else hs[0]
        return torch.cat(s.logits) if len(s.logits) > 1 else s.logits[0]

    def micro_rows(self, T: int, capacity: int) -> int:
        """Rows per micro-batch for a pass of T tokens: the policy's batch size, or a multiple
        of it when T is short. The plan holds two widest-layer intermediates per token of one
        micro-batch at the full context (batch_size x capacity tokens) and a pass needs about
        three per token, so a decode step (T = 1) runs the whole block as one micro-batch (a
        matmul of 128 rows reaches about twice the FLOP rate of four of 32 here) while a prompt
        keeps the policy's micro-batches."""
        bs = self.policy.batch_size
        return bs * max(1, (2 * capacity) // (3 * max(1, T)))

    def _run_ops(self, s: _Pass) -> None:
        """Interpret the zig-zag schedule for one forward pass."""
        m, cache, rows = self.model, s.cache, s.rows
        weights: dict[str, torch.Tensor] = {}
        for op in zigzag(len(self.units), len(rows), lookahead=STAGING_SLOTS - 1):
            u = self.units[op.unit]
            key = (u.index, op.batch)
            if op.kind == "load":
                if self.loader is not None:
                    self.loader.submit(op.unit)
            elif op.kind == "wait":
                weights = self._weights(s, op.unit)
            elif op.kind == "free":
                if op.unit in s.copied:  # the loader may refill the slot only once they are
                    s.copied.pop(op.unit).synchronize()
                if self.wstream is not None:
                    self.wstream.release(op.unit)
                if self.loader is not None:
                    self.loader.free(op.unit)
            elif u.kind != "layer":
                if op.kind == "compute":
                    self._head_slab(s, op.batch, u.index, weights["lm_head.weight"])
            elif op.kind == "load_cache":
                r = rows[op.batch]
                if key in s.streamed:  # read ahead into the ring
                    kf, vf, row0 = s.streamed[key]
                    self.kv_stream.fetch(key, kf, vf, row0, r.stop - r.start, s.step.start)
                elif self._host_kv(s, u.index):
                    if not self.cpu_cache_compute:  # copied to the device ring ahead
                        self.dev_kv.fetch(key, cache.keys[u.index][r], cache.values[u.index][r])
                elif u.index in s.mapped_kv:
                    for kv in (cache.keys[u.index][r], cache.values[u.index][r]):
                        for t in kv.parts() if isinstance(kv, QuantKV) else (kv,):
                            advise_willneed(t)
            elif op.kind == "store_cache":
                if key in s.streamed:  # written back behind
                    self.kv_stream.store(key, s.step.start, s.step.end)
                elif self._host_kv(s, u.index) and not self.cpu_cache_compute:
                    self.dev_kv.store(key)
            elif op.kind == "compute":
                k, r, i = op.batch, rows[op.batch], u.index
                step = s.steps[k]
                if key in s.streamed:
                    t0 = time.perf_counter()
                    kc, vc = self.kv_stream.get(key)
                    self.times["kv_wait_s"] += time.perf_counter() - t0
                    if self.cuda and not self.cpu_cache_compute:
                        host = kc, vc
                        kc, vc = (to_device_rows(t, self.device) for t in host)
                elif self._host_kv(s, i) and not self.cpu_cache_compute:
                    kc, vc = self.dev_kv.get(key)
                else:
                    kc, vc = cache.keys[i][r], cache.values[i][r]
                if self.cuda and isinstance(kc, torch.Tensor) and kc.device.type == "cpu":
                    step = s.cpu_steps[k]  # attention where the cache is (host RAM)
                h = s.hs[k].to(self.device)  # activations placed in host RAM or on disk come in
                s.hs[k] = m.blocks()[str(i)](h, s.ctxs[k], kc, vc, step)
                if key in s.streamed and self.cuda and not self.cpu_cache_compute:
                    for dev, ring in zip((kc, vc), host):  # back before the ring goes to disk
                        to_host_rows(dev, ring)
                if s.act is not None and k in s.on_disk:
                    s.hs[k] = s.act[r].copy_(s.hs[k])

    def _weights(self, s: _Pass, unit: int) -> dict[str, torch.Tensor]:
        """Unit's weights ready for its computes (CUDA: materialized on the side stream into the
        scratch buffer the previous unit does not use, the compute stream waiting for it)."""
        t0 = time.perf_counter()
        staging = self.loader.wait(unit) if self.loader is not None else None
        t1 = time.perf_counter()
        if self.wstream is None:
            weights = self._materialize(unit, staging)
        else:
            with torch.cuda.stream(self.wstream.stream):
                self.scratch = self.wstream.begin(unit)
                weights = self._materialize(unit, staging)
            ready = self.wstream.ready()
            if staging is not None:  # the copies out of it are queued, not done
                s.copied[unit] = ready
        self.times["weights_wait_s"] += t1 - t0
        self.times["materialize_s"] += time.perf_counter() - t1
        return weights

    def _host_kv(self, s: _Pass, layer: int) -> bool:
        """CUDA: the layer's cache is a host tensor (pinned RAM) rather than on the GPU."""
        t = s.cache.keys[layer]
        return self.cuda and isinstance(t, torch.Tensor) and t.device.type == "cpu"

    def _head_slab(self, s: _Pass, k: int, col: int, w: torch.Tensor) -> None:
        """Micro-batch k's logits for vocabulary columns [col, col + slab rows)."""
        if s.normed[k] is None:
            h = s.hs[k][:, -1:] if s.last_only else s.hs[k]
            h = h.to(self.device)
            s.normed[k] = self.model.head(h)  # final norm (and projection) before the vocab
            shape = (*s.normed[k].shape[:-1], self.vocab_size)
            s.logits[k] = torch.empty(shape, dtype=torch.float32, device=self.device)
        if isinstance(w, (PackedInt4, PackedInt8)):
            y = w.linear(s.normed[k])
        elif isinstance(w, list) or w.dtype == torch.bfloat16:  # multiplied as stored, in place
            n = sum(p.shape[0] for p in w) if isinstance(w, list) else w.shape[0]
            bf16_linear(s.normed[k], w, out=s.logits[k][..., col : col + n])
            return
        else:
            y = F.linear(s.normed[k], w)
        s.logits[k][..., col : col + y.shape[-1]] = y

    def _act_on_disk(self, num_batches: int) -> set[int]:
        keep = round(num_batches * (self.policy.act_device + self.policy.act_cpu) / 100)
        if keep < num_batches and self.offload_dir is None:
            raise LayercakeError("the policy puts activations on disk: give an offload dir")
        return set(range(keep, num_batches))

    @property
    def bytes_read(self) -> int:
        return self.loader.bytes_read if self.loader is not None else 0

    @property
    def read_s(self) -> float:
        """Seconds the loader spent reading weights (its rate: ``bytes_read / read_s``)."""
        return self.loader.read_s if self.loader is not None else 0.0

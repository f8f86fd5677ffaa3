"""The offload executor: runs a model whose weights, KV cache and activations are spread over
device, host RAM and disk, following the zig-zag schedule, with disk reads in a background thread.

It wraps the family's own model (built on the meta device) and never forks its math: per unit it
binds the unit's weights into the model's modules and calls the same blocks ``LocalRunner`` runs;
the head runs as the model's ``final_norm`` and then its projection, one slab of vocabulary rows
per streamed unit. Where the weights lie is ``placement``'s, a pass's KV rows and spilled
activations ``passes``', every memory figure ``footprint``'s; this module interprets the schedule
and makes each unit's weights ready in their form.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from layercake.config import BaseConfig
from layercake.kv_cache import AttentionStep, KVCache
from layercake.models import family
from layercake.models.parts import Parts
from layercake.offload.cuda import WeightStream
from layercake.offload.kvdisk import DiskKV
from layercake.offload.kvtiers import KVTiers
from layercake.offload.passes import Activations, KVMover, Pass
from layercake.offload.placement import Placed, Placement
from layercake.offload.policy import STAGING_SLOTS, Policy
from layercake.offload.schedule import zigzag
from layercake.offload.store import Entry, Unit, plan_units
from layercake.ops import kernels
from layercake.ops import linear as ops
from layercake.ops.int4pack import PackedInt4, PackedInt8
from layercake.ops.kernels import bf16_linear
from layercake.options import Options
from layercake.quant import QTensor, dequantize


class OffloadRunner(Placement):
    """A Runner (``new_cache`` / ``forward``) for a model placed by a ``Policy``."""

    def __init__(
        self,
        options: Options,
        ckpt: Any,
        config: BaseConfig,
        source: Path,
        parts: Parts,
        policy: Policy,
        kv_budget: int | None = None,
    ) -> None:
        """``options`` give the device, dtype, compression, offload dir and
        ``cpu_cache_compute``; ``kv_budget``: bytes of KV cache the device tier holds."""
        device, dtype, compress = options.torch_device, options.torch_dtype, options.compression
        offload_dir = options.offload_dir
        offload_dir = Path(offload_dir).expanduser() if offload_dir is not None else None
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
        packed = device.type == "cpu" and dtype == torch.float32
        self.units = plan_units(ckpt, self.model, parts.layers, parts.head, dtype, compress, packed)
        # streamed bf16 weights multiply as stored (all resident ones are held in fp32 instead)
        self.direct = (
            device.type == "cpu"
            and dtype == torch.float32
            and policy.w_device < 100
            and kernels.available()
        )
        self._packed_modules()
        self._place_weights(ckpt, source)
        self.block_size = policy.block_size
        self.activations = Activations(offload_dir, dtype)
        self.kv = KVTiers(
            config, self.layers, policy, device, dtype, offload_dir, kv_budget, self.cache_quant
        )
        # where a pass spends its time: blocked on weight reads, converting weights to the
        # compute dtype, blocked on KV cache reads, and in total
        self.times = dict.fromkeys(("weights_wait_s", "materialize_s", "kv_wait_s", "forward_s"),
                                   0.0)  # fmt: skip
        self.kv_mover = KVMover(device, options.cpu_cache_compute, self.times)
        self.kv_stream = self.kv_mover.stream
        # CUDA: weights materialized on a side stream, double-buffered
        self.wstream = WeightStream(device, self.scratch) if self.cuda else None

    # ---- weight forms ----------------------------------------------------------------------
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
        """The form the chooser (``ops.linear.choose``) picks for a streamed weight entry."""
        stored = None if e.quant else e.torch_dtype
        shape = e.weight_shape if e.form else e.shape
        return ops.choose(shape, stored=stored, spec=spec, device=self.device, dtype=self.dtype,
                          streamed=True)  # fmt: skip

    def _packed_modules(self) -> None:
        """Linears whose weight is held in a form other than dense (the int4 kernel's, per-row
        int8, bf16 as stored) become ``ops.linear.Linear``s, their weight bound per unit; the
        head's slabs are multiplied in ``forward``."""
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
        self, p: Placed, staging: torch.Tensor | None, disk_start: int
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
        self, p: Placed, staging: torch.Tensor | None, disk_start: int
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

    def _dequantize(self, p: Placed, staging: torch.Tensor | None, disk_start: int) -> torch.Tensor:
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
        on_disk = self.activations.on_disk(self.policy, len(rows))
        s = Pass(
            cache=cache,
            step=step,
            rows=rows,
            hs=hs,
            ctxs=[m.context(positions[r], hs[0].dtype) for r in rows],
            steps=[AttentionStep(step.start, step.end, step.mask[r]) for r in rows],
            on_disk=on_disk,
            act=self.activations.buffer((B, T, hs[0].shape[-1])) if on_disk else None,
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
            self.kv_mover.finish()
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

    def _run_ops(self, s: Pass) -> None:
        """Interpret the zig-zag schedule for one forward pass."""
        m, rows = self.model, s.rows
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
                self.kv_mover.load(s, key, rows[op.batch])
            elif op.kind == "store_cache":
                self.kv_mover.store(s, key)
            elif op.kind == "compute":
                k, r = op.batch, rows[op.batch]
                kc, vc, host = self.kv_mover.get(s, key, r)
                step = s.steps[k]
                if self.cuda and isinstance(kc, torch.Tensor) and kc.device.type == "cpu":
                    step = s.cpu_steps[k]  # attention where the cache is (host RAM)
                h = s.hs[k].to(self.device)  # activations placed in host RAM or on disk come in
                s.hs[k] = m.blocks()[str(u.index)](h, s.ctxs[k], kc, vc, step)
                if host is not None:
                    self.kv_mover.put_back(kc, vc, host)
                if s.act is not None and k in s.on_disk:
                    s.hs[k] = s.act[r].copy_(s.hs[k])

    def _weights(self, s: Pass, unit: int) -> dict[str, torch.Tensor]:
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

    def _head_slab(self, s: Pass, k: int, col: int, w: torch.Tensor) -> None:
        """Micro-batch k's logits for vocabulary columns [col, col + slab rows)."""
        if s.normed[k] is None:
            h = s.hs[k][:, -1:] if s.last_only else s.hs[k]
            h = h.to(self.device)
            s.normed[k] = self.model.final_norm(h)  # the slabs below are ``model.project``
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

    @property
    def bytes_read(self) -> int:
        return self.loader.bytes_read if self.loader is not None else 0

    @property
    def read_s(self) -> float:
        """Seconds the loader spent reading weights (its rate: ``bytes_read / read_s``)."""
        return self.loader.read_s if self.loader is not None else 0.0

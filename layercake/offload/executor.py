"""The offload executor: runs a model whose weights, KV cache and activations are spread over
device, host RAM and disk, following the zig-zag schedule, with disk reads in a background thread.

It wraps the family's own model (built on the meta device) and never forks its math: per unit it
binds the unit's weights into the model's modules and calls the same layers ``LocalRunner`` runs;
the head runs as the model's ``final_norm`` and then its projection, one slab of vocabulary rows
per streamed unit. Where the weights lie is ``placement``'s, how a unit's stored bytes become
its weights ``materialize``'s, a pass's KV rows and spilled activations ``passes``', every memory
figure ``footprint``'s; this module interprets the schedule.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from layercake.config import BaseConfig
from layercake.kv_cache import AttentionStep, KVCache
from layercake.models import family
from layercake.models.parts import Parts
from layercake.models.tied import ArgmaxRows, head_is_tied, token_embedding
from layercake.offload.cuda import WeightStream
from layercake.offload.experts import ExpertUnits
from layercake.offload.kvdisk import DiskKV
from layercake.offload.kvtiers import KVTiers
from layercake.offload.materialize import Materializer
from layercake.offload.passes import Activations, KVMover, Pass
from layercake.offload.placement import Placement
from layercake.offload.policy import STAGING_SLOTS, Policy
from layercake.offload.schedule import zigzag
from layercake.offload.store import plan_units
from layercake.offload.tiers import trim_heap
from layercake.ops import linear as ops
from layercake.ops.kernels import bf16_linear
from layercake.options import Options


class OffloadRunner(Placement, Materializer):
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
        self.pass_tokens = options.pass_tokens  # the plan's activations: passes this long
        self.cuda = device.type == "cuda"
        fam = family(config.model_type)
        with torch.device("meta"):
            self.model = fam.Model(config, parts)
        int4pack = device.type == "cpu" and dtype == torch.float32
        self.units = plan_units(ckpt, self.model, parts.layers, parts.head, dtype, compress,
                                int4pack)  # fmt: skip
        # streamed bf16 weights may multiply as stored (all resident ones are held in fp32)
        self.as_stored = device.type == "cpu" and policy.w_device < 100
        self.bind_forms()
        self.bind_static(ckpt)
        # a tied head keeps its argmax tokens' rows: the next lookup reads no table page (not
        # where compression holds the head in other values than the table's)
        self.head_tied = parts.head and not compress and head_is_tied(self.model, ckpt)
        self.head_rows: dict[int, torch.Tensor] = {}  # the last head pass's, by token id
        self._place_weights(ckpt, source)
        self.scheduled = [j for j, u in enumerate(self.units) if u.kind != "expert"]
        self.experts = ExpertUnits(self) if len(self.scheduled) < len(self.units) else None
        self.block_size = policy.block_size
        self.activations = Activations(offload_dir, dtype)
        self.kv = KVTiers(
            config, self.layers, policy, device, dtype, offload_dir, kv_budget, self.cache_quant
        )
        # where a pass spends its time: waiting for weight reads, materializing weights,
        # waiting for KV cache reads, and in total
        self.times = dict.fromkeys(("weights_wait_s", "materialize_s", "kv_wait_s", "forward_s",
                                    "embed_s"), 0.0)  # fmt: skip
        self.kv_mover = KVMover(device, options.cpu_cache_compute, self.times)
        # per pass: (tokens per row, seconds, of them waiting for weights, bytes read)
        self.passes: deque[tuple[int, float, float, int]] = deque(maxlen=PASSES_KEPT)
        self.kv_stream = self.kv_mover.stream
        # CUDA: weights materialized on a side stream, double-buffered
        self.wstream = WeightStream(device, self.scratch) if self.cuda else None

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
        if self.experts is not None:  # a prompt's pass gives the decode steps' extras back;
            self.experts.begin_pass(T, B * T)  # the first layer's experts read from the start
        step = cache.begin(token_mask.to(self.device))
        bs = self.micro_rows(T, min(cache.capacity, self.pass_tokens or cache.capacity))
        rows = [slice(a, min(a + bs, B)) for a in range(0, B, bs)]
        m = self.model
        t0 = time.perf_counter()
        hs = [m.embed(tokens[r], positions[r]) if self.parts.embed else tokens[r] for r in rows]
        self.times["embed_s"] += time.perf_counter() - t0
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
            argmax=ArgmaxRows() if self.head_tied and last_only else None,
        )
        t0, w0, b0 = time.perf_counter(), self.times["weights_wait_s"], self.bytes_read
        after_prompt = T == 1 and bool(self.passes) and self.passes[-1][0] > 1
        try:
            with _pass_allocations(T > 1, self.experts is not None):
                self._run_ops(s)
        finally:
            self.kv_mover.finish()
        if after_prompt and self.experts is not None:
            # the first step after a prompt let go of what the prompt's pass kept for its
            # layers (``models.moe.RowsBuffer``: 64 MiB at B=64) on the heap after the pass's
            # trim; glibc keeps a freed block that is not at the heap's top (0.07 GB held
            # through the decode steps of a B=64 run, README MoE offload, moe10)
            trim_heap()
        self.times["forward_s"] += time.perf_counter() - t0
        self.passes.append((T, time.perf_counter() - t0, self.times["weights_wait_s"] - w0,
                            self.bytes_read - b0))  # fmt: skip
        cache.advance(step)
        if s.argmax is not None:
            self.keep_head_rows(s.argmax.rows())
        if not self.parts.head:
            hs = [h.to(self.device) for h in hs]
            return torch.cat(hs) if len(hs) > 1 else hs[0]
        return torch.cat(s.logits) if len(s.logits) > 1 else s.logits[0]

    def keep_head_rows(self, rows: dict[int, torch.Tensor]) -> None:
        """The head's argmax rows of this pass, for a pipeline to send with the ids; with the
        embeddings here too (one host), the next lookup takes them."""
        self.head_rows = rows
        emb = token_embedding(self.model) if self.parts.embed else None
        if emb is not None:
            emb.remember(rows)

    def micro_rows(self, T: int, capacity: int) -> int:
        """Rows per micro-batch for a pass of T tokens: the policy's batch size, or a multiple
        of it when T is short. The plan holds two widest-layer intermediates per token of one
        micro-batch at the full context (batch_size x capacity tokens, or the planned
        ``pass_tokens`` when shorter) and a pass needs about
        three per token, so a decode step (T = 1) runs the whole block as one micro-batch (one
        wide matmul runs at a higher FLOP rate than several narrow ones) while a prompt keeps
        the policy's micro-batches."""
        bs = self.policy.batch_size
        return bs * max(1, (2 * capacity) // (3 * max(1, T)))

    def _run_ops(self, s: Pass) -> None:
        """Interpret the zig-zag schedule for one forward pass."""
        m, rows = self.model, s.rows
        weights: dict[str, object] = {}
        seq = self.scheduled  # routed experts run inside their layer (``offload.experts``)
        for op in zigzag(len(seq), len(rows), lookahead=STAGING_SLOTS - 1):
            j = seq[op.unit]
            u = self.units[j]
            key = (u.index, op.batch)
            if op.kind == "load":
                if self.loader is not None:
                    self.loader.submit(j)
            elif op.kind == "wait":
                weights = self._weights(s, j)
            elif op.kind == "free":
                if j in s.copied:  # the loader may refill the slot only once they are
                    s.copied.pop(j).synchronize()
                if self.wstream is not None:
                    self.wstream.release(j)
                if self.loader is not None:
                    self.loader.free(j)
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
                s.hs[k] = m.layers()[str(u.index)](h, s.ctxs[k], kc, vc, step)
                if host is not None:
                    self.kv_mover.put_back(kc, vc, host)
                if s.act is not None and k in s.on_disk:
                    s.hs[k] = s.act[r].copy_(s.hs[k])

    def _weights(self, s: Pass, unit: int) -> dict[str, object]:
        """Unit's weights ready for its computes (CUDA: materialized on the side stream into the
        scratch buffer the previous unit does not use, the compute stream waiting for it)."""
        t0 = time.perf_counter()
        staging = self.loader.wait(unit) if self.loader is not None else None
        t1 = time.perf_counter()
        if self.wstream is None:
            weights = self.materialize(unit, staging)
        else:
            with torch.cuda.stream(self.wstream.stream):
                self.scratch = self.wstream.begin(unit)
                weights = self.materialize(unit, staging)
            ready = self.wstream.ready()
            if staging is not None:  # the copies out of it are queued, not done
                s.copied[unit] = ready
        self.times["weights_wait_s"] += t1 - t0
        self.times["materialize_s"] += time.perf_counter() - t1
        return weights

    def _head_slab(self, s: Pass, k: int, col: int, w: object) -> None:
        """Micro-batch k's logits for vocabulary columns [col, col + slab rows)."""
        if s.normed[k] is None:
            h = s.hs[k][:, -1:] if s.last_only else s.hs[k]
            h = h.to(self.device)
            s.normed[k] = self.model.final_norm(h)  # the slabs below are ``model.project``
            shape = (*s.normed[k].shape[:-1], self.vocab_size)
            s.logits[k] = torch.empty(shape, dtype=torch.float32, device=self.device)
        if isinstance(w, ops.BF16):  # multiplied as stored, into the logits
            n = w.shape[0]
            bf16_linear(s.normed[k], w.data, out=s.logits[k][..., col : col + n])
        else:
            y = F.linear(s.normed[k], w) if isinstance(w, torch.Tensor) else w.linear(s.normed[k])
            n = y.shape[-1]
            s.logits[k][..., col : col + n] = y
        if s.argmax is not None:  # this slab's rows are in memory now, later maybe not
            s.argmax.update(k, s.logits[k][:, -1, col : col + n], col, w)

    @property
    def bytes_read(self) -> int:
        return sum(x.bytes_read for x in (self.loader, self.expert_loader) if x is not None)

    @property
    def read_s(self) -> float:
        """Seconds the loaders spent reading weights (their rate: ``bytes_read / read_s``)."""
        return sum(x.read_s for x in (self.loader, self.expert_loader) if x is not None)


# glibc's M_MMAP_THRESHOLD (mallopt parameter -3): allocations of at least this many bytes get
# mappings of their own, which go back to the system when freed. ``llm.load`` leaves 32 MB.
PASS_MMAP_THRESHOLD = 1 << 20
PASSES_KEPT = 1024  # the latest passes' times (``OffloadRunner.passes``)
HEAP_MMAP_THRESHOLD = 32 << 20
HEAP_TRIM_THRESHOLD = 1 << 30  # M_TRIM_THRESHOLD while a MoE prompt's pass runs (``_heap_pass``)
DEFAULT_TRIM_THRESHOLD = 128 << 10  # glibc's default M_TRIM_THRESHOLD


@contextlib.contextmanager
def _pass_allocations(many: bool, experts: bool) -> Iterator[None]:
    """The allocator of a pass: a pass of many tokens of a model with routed experts on glibc's
    heap (``_heap_pass``), of other models on mappings of their own (``_mapped_allocations``);
    one-token steps as they are."""
    if many and experts:
        with _heap_pass():
            yield
    else:
        with _mapped_allocations(many):
            yield


@contextlib.contextmanager
def _heap_pass() -> Iterator[None]:
    """A prompt's pass of a mixture of experts allocates per expert its intermediates (1-7 MB at
    B=64) and per layer the attention's (8-25 MB), each a fresh mapping under
    ``_mapped_allocations``: ~290k page faults a pass of the B=64 x 16 OLMoE-shaped benchmark,
    0.3 s of its 2.2 s in memory (moe9). Its layers repeat the same shapes (one expert's rows
    after another's, freed before the next), so on the heap, kept (trim threshold raised) while
    the pass runs, each later layer reuses the first one's memory without faults; at the end of
    the pass the heap's free pages go back (``trim_heap``), so the pass's high-water mark is not
    kept (the cap's page cache gets it back between passes)."""
    libc = glibc()
    if libc is None:
        yield
        return
    libc.mallopt(-3, HEAP_MMAP_THRESHOLD)
    libc.mallopt(-1, HEAP_TRIM_THRESHOLD)  # M_TRIM_THRESHOLD
    try:
        yield
    finally:
        libc.mallopt(-1, DEFAULT_TRIM_THRESHOLD)
        trim_heap()


@contextlib.contextmanager
def _mapped_allocations(on: bool) -> Iterator[None]:
    """A pass of many tokens (a prompt or its chunk) allocates and frees activations of several
    MB to tens of MB, in changing sizes, layer after layer. From glibc's heap the freed ones
    leave holes that later sizes do not fit, and the heap grew past the plan over one prompt
    (a one-host run planned to its memory cap was OOM-killed). From mappings of
    their own they go back when freed. One-token steps keep the heap: their tensors are small,
    and fresh mappings would page-fault on every step."""
    libc = glibc() if on else None
    if libc is None:
        yield
        return
    libc.mallopt(-3, PASS_MMAP_THRESHOLD)
    try:
        yield
    finally:
        libc.mallopt(-3, HEAP_MMAP_THRESHOLD)


def glibc() -> Any:
    """glibc, or None where there is none to tune."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt  # noqa: B018 - absent outside glibc
    except (OSError, AttributeError):
        return None
    return libc

"""One pipeline stage: a node's segments of the model, each a Runner (resident, or offloaded with
the node's own budgets), their KV caches per micro-batch, and the worker loop
(receive -> forward -> send) that rank 0's ``PipelineRunner`` drives.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from layercake.config import BaseConfig
from layercake.errors import LayercakeError
from layercake.kv_cache import KVCache
from layercake.pipeline.topology import Segment, Topology
from layercake.pipeline.transport import (
    FOREVER,
    BadFrame,
    Frame,
    Kind,
    PeerError,
    Transport,
    decode_text,
    encode_text,
)

MARKS = (
    "compute_s",
    "weights_wait_s",
    "peer_wait_s",
    "send_wait_s",
    "bytes_in",
    "bytes_out",
    "disk_bytes",
    "disk_read_s",
)
WORKER_WAIT = 0.8  # of the job's timeout: a worker reports a silent peer before rank 0 gives up


@dataclass(frozen=True)
class Limits:
    """What one job may ask of a node (the topology's ``max_batch``/``max_context`` and the
    model's widths): every frame and cache request is checked against it before allocation."""

    max_batch: int
    max_context: int
    hidden: int
    vocab: int

    def cache(self, sizes: list[int], capacity: int) -> str | None:
        """Why a cache of micro-batches ``sizes`` x ``capacity`` slots is refused (None: fine)."""
        if not sizes or min(sizes) < 1 or sum(sizes) > self.max_batch:
            return (f"micro-batch sizes {sizes[:8]} (total {sum(sizes)}) outside 1..max_batch "
                    f"{self.max_batch}")  # fmt: skip
        if not 0 < capacity <= self.max_context:
            return f"capacity {capacity} outside 1..max_context {self.max_context}"
        return None

    def control_bytes(self) -> int:  # FORWARD's positions (int64) and mask (uint8), the most
        return self.max_batch * self.max_context * 9

    def data_bytes(self, rows: int, T: int, logits: bool) -> int:  # fp32 at most on the wire
        return rows * T * 4 * (self.vocab if logits else max(self.hidden, 2))


class Stage:
    """The segments of the path that ``rank`` holds, ready to run, and their caches."""

    def __init__(self, topology: Topology, rank: int, ckpt: Any, config: BaseConfig,
                 source: Path, dtype: str | torch.dtype | None = None) -> None:  # fmt: skip
        from layercake.devices import parse_device, parse_dtype

        self.topology, self.rank = topology, rank
        self.node = topology.nodes[rank]
        self.device = parse_device(self.node.device)
        self.dtype = parse_dtype(self.node.options.get("dtype", dtype), self.device)
        wire = topology.wire_dtype
        self.wire_dtype = getattr(torch, wire) if wire else self.dtype
        self.segments = topology.segments(rank)
        self.limits = Limits(topology.max_batch,
                             topology.max_context or config.max_position_embeddings,
                             config.hidden_size, config.vocab_size)  # fmt: skip
        from layercake.pipeline.node import build_runners

        self.runners, self.pool = build_runners(self, ckpt, config, source)
        self.cache_id = -1
        self.sizes: list[int] = []
        self.caches: dict[int, list[KVCache]] = {}  # segment index -> one cache per micro-batch
        self.times = dict.fromkeys(("compute_s", "peer_wait_s", "send_wait_s"), 0.0)
        self.steps = 0  # forward passes served
        self.marks: list[list[float]] = []  # the running totals after each pass (end_step)
        self.ids_only = False  # this forward's head sends argmax ids, not logits

    @contextlib.contextmanager
    def timed(self, key: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[key] += time.perf_counter() - t0

    def report(self) -> dict[str, Any]:
        """Where this node's time went over the job (seconds), and its passes: compute (the
        segments' forwards, weight waits included), weights_wait (an offloaded segment waiting
        for the disk), peer_wait (for a neighbour's frame: network and its compute = idle here),
        send_wait (for frames to leave); ``marks``: those running totals after each pass."""
        from layercake.pipeline.node import memory_plan

        return dict(self._totals(), steps=self.steps, memory=memory_plan(self.runners, self.pool),
                    marks=self.marks)  # fmt: skip

    def _totals(self) -> dict[str, float]:
        out = {k: round(v, 3) for k, v in self.times.items()}
        out["disk_bytes"] = out["disk_read_s"] = 0  # an offloaded segment's weight reads
        for r in self.runners.values():
            times = dict(getattr(r, "times", None) or {}, disk_read_s=getattr(r, "read_s", 0))
            for k, v in times.items():
                out[k] = round(out.get(k, 0.0) + v, 3)
            out["disk_bytes"] += getattr(r, "bytes_read", 0)
        return out

    def end_step(self, transport: Transport) -> None:
        """A forward pass is done: count it and note the running totals (``MARKS``: compute,
        weight waits, peer waits, sends, payload bytes in and out, weight bytes read from disk
        and the seconds spent reading them), so that a job's report can
        be cut after any pass (a benchmark leaves out what ran after its timed part)."""
        self.steps += 1
        t = self._totals()
        io = [transport.bytes_received, transport.bytes_sent, t["disk_bytes"], t["disk_read_s"]]
        self.marks.append([t.get(k, 0.0) for k in MARKS[:4]] + io)

    def new_cache(self, cache_id: int, sizes: list[int], capacity: int) -> None:
        """One cache per micro-batch per segment; replaces the previous job's caches."""
        why = self.limits.cache(sizes, capacity)
        if why:
            raise BadFrame(f"node {self.node.name}: cache request refused: {why}")
        self.caches = {}  # the old ones go first: memory for one set at a time
        self.cache_id, self.sizes = cache_id, list(sizes)
        for s in self.segments:
            r = self.runners[s.index]
            self.caches[s.index] = [r.new_cache(b, capacity) for b in sizes]

    def check(self, cache_id: int) -> None:
        if cache_id != self.cache_id:
            raise LayercakeError(
                f"node {self.node.name}: cache {cache_id} is gone (a newer one replaced it): "
                "a pipeline keeps one live cache at a time"
            )

    def select(self, cache_id: int, rows: torch.Tensor) -> None:
        self.check(cache_id)
        n = sum(self.sizes)
        ok = rows.dim() == 1 and 0 < len(rows) <= n and rows.dtype == torch.int64
        if not ok or rows.min() < 0 or rows.max() >= n or (rows.diff() <= 0).any():
            raise BadFrame(f"node {self.node.name}: SELECT rows are not ascending rows of {n}")
        sizes, picks = split_rows(self.sizes, rows)
        for idx, caches in self.caches.items():
            kept = []
            for m, local in enumerate(picks):
                if local is None:
                    continue
                if len(local) != self.sizes[m]:
                    caches[m].select(local.to(self.device))
                kept.append(caches[m])
            self.caches[idx] = kept
        self.sizes = sizes

    def prefetch_after(self, seg: Segment) -> None:
        """Once ``seg`` is done, start reading the next held range's first streamed weights
        while the other nodes compute: through the pool of a node's ranges as far as it holds
        (``pool.read_ahead``), else an offloaded segment's disk units, as many as its staging
        slots hold. The ring wraps: after the last range, the first one's for the next step
        (a node with one range reads its own first units while the others run theirs)."""
        i = self.segments.index(seg)
        nxt = (i + 1) % len(self.segments)
        if self.pool is not None:
            self.pool.read_ahead(nxt)
            return
        loader = getattr(self.runners[self.segments[nxt].index], "loader", None)
        if loader is not None:
            for unit in sorted(loader.ranges)[: len(loader.slots)]:
                loader.submit(unit)

    def focus(self, seg: Segment, more: int) -> None:
        """``seg`` runs now, ``more`` times again in this pass: the pool keeps its units."""
        if self.pool is not None:
            self.pool.focus(self.segments.index(seg), more)

    @torch.inference_mode()
    def run(self, seg: Segment, m: int, x: torch.Tensor, positions: torch.Tensor,
            mask: torch.Tensor | None, last_only: bool,
            final: bool = True) -> torch.Tensor:  # fmt: skip
        """One piece through one segment. ``final``: the piece ends its micro-batch's tokens
        (an earlier chunk's last-position logits are nobody's: the head sends none)."""
        if x.is_floating_point():
            x = x.to(self.device, self.dtype)
        if mask is None:  # (B, T): a runner would shape its default after hidden states
            mask = torch.ones(positions.shape, dtype=torch.bool)
        with self.timed("compute_s"):
            out = self.runners[seg.index].forward(
                x, positions, self.caches[seg.index][m], mask, last_only
            )
        if seg.parts.head and last_only and not final:
            return out[:, :, :0]
        if seg.parts.head and self.ids_only:  # the greedy argmax of the last position
            ids = out[:, -1:].argmax(-1)  # (see use_sampler), with their embedding rows
            rows = self.head_rows(seg, ids)
            return ids if rows is None else (ids, rows)
        return out if seg.parts.head else out.to(self.wire_dtype)

    def head_rows(self, seg: Segment, ids: torch.Tensor) -> torch.Tensor | None:
        """The embedding rows of ``ids`` (rows, 1) as a tied head's pass kept them, for rank 0's
        next lookup (it holds the embeddings: the table's pages need no read there), or None
        (an untied or quantized head, a runner that keeps none, or the embeddings elsewhere)."""
        known = getattr(self.runners[seg.index], "head_rows", None)
        if not known or self.topology.path[0].rank != 0:
            return None
        got = [known.get(i) for i in ids.view(-1).tolist()]
        return None if any(r is None for r in got) else torch.stack(got)


def split_rows(sizes: list[int], rows: torch.Tensor) -> tuple[list[int], list[torch.Tensor | None]]:
    """Rows kept (global indices, ascending) -> new micro-batch sizes and, per old micro-batch,
    its local rows (None when none is left: the micro-batch goes)."""
    out_sizes, picks, start = [], [], 0
    rows = rows.cpu()
    for size in sizes:
        local = rows[(rows >= start) & (rows < start + size)] - start
        start += size
        if len(local):
            out_sizes.append(len(local))
            picks.append(local)
        else:
            picks.append(None)
    return out_sizes, picks


def neighbours(topology: Topology, seg: Segment) -> tuple[int, int]:
    """Where a segment's input comes from and its output goes (rank 0 feeds and collects)."""
    path = topology.path
    prev = path[seg.index - 1].rank if seg.index > 0 else 0
    nxt = path[seg.index + 1].rank if seg.index + 1 < len(path) else 0
    return prev, nxt


def pieces(sizes: list[int], T: int, chunks: int) -> list[tuple[int, int, int]]:
    """The order a pass goes through the pipeline: micro-batch by micro-batch, each split along
    its tokens into ``chunks`` (a long prompt keeps every node busy without more caches):
    ``(micro-batch, t0, t1)``."""
    c = max(1, min(chunks, T))
    bounds = [T * k // c for k in range(c + 1)]
    return [(m, bounds[k], bounds[k + 1]) for m in range(len(sizes)) for k in range(c)]


def run_segments(stage: Stage, transport: Transport, cache_id: int, positions: torch.Tensor,
                 mask: torch.Tensor | None, last_only: bool, inputs: list[torch.Tensor] | None,
                 wait: float, chunks: int = 1) -> tuple[list[Any], str | None, bool]:  # fmt: skip
    """Run this rank's segments in path order, every piece (``pieces``) in turn: receive (or
    take ``inputs`` for the path's first segment), compute, send on. A failure upstream or here
    travels on as an ERROR frame in place of the output, so every peer stays in step. Returns
    the outputs of a final segment held here (the logits on rank 0), the first error, and
    whether a peer was lost (the job cannot go on)."""
    name = stage.node.name
    pos_m = positions.split(stage.sizes)
    mask_m = mask.split(stage.sizes) if mask is not None else [None] * len(stage.sizes)
    plan = pieces(stage.sizes, positions.shape[1], chunks)
    error: str | None = None
    lost = False
    finals: list[Any] = []
    last = len(stage.topology.path) - 1
    for seg in stage.segments:
        prev, nxt = neighbours(stage.topology, seg)
        for p, (m, t0, t1) in enumerate(plan):
            out = msg = None
            pos = pos_m[m][:, t0:t1]
            if seg.index == 0 and inputs is not None:
                x = inputs[p]
            else:
                x, msg, gone = receive(stage, transport, prev, cache_id, p, pos.shape, wait)
                lost = lost or gone
            if msg is None:
                try:
                    msk = None if mask_m[m] is None else mask_m[m][:, t0:t1]
                    stage.focus(seg, len(plan) - p - 1)
                    out = stage.run(seg, m, x, pos, msk, last_only, t1 == pos_m[m].shape[1])
                except Exception as e:  # the job fails; the peers are told so, then rank 0 raises
                    msg = f"node {name}: {type(e).__name__}: {e}" if not isinstance(
                        e, LayercakeError) else f"node {name}: {e}"  # fmt: skip
            error = error or msg
            if seg.index == last and nxt == stage.rank:
                finals.append(out)
            elif msg is not None:
                transport.send(nxt, Kind.ERROR, (cache_id, p, int(lost)), [encode_text(msg)])
            else:  # a head's ids may travel with their embedding rows
                transport.send(nxt, Kind.DATA, (cache_id, p), list(out) if isinstance(
                    out, tuple) else [out])  # fmt: skip
        stage.prefetch_after(seg)
    return finals, error, lost


def receive(stage: Stage, transport: Transport, src: int, cache_id: int, m: int,
            shape: torch.Size, wait: float, head: bool = False
            ) -> tuple[Any, str | None, bool]:  # fmt: skip
    """Piece ``m``'s input from ``src``, checked against its expected rows and length
    (``head``: the head's output, logits or ids, rows only): (tensor, None, False), or (None,
    why, peer lost). A bad frame ends the job (the stream is out of step), not this process."""
    rows, T = shape
    try:
        with stage.timed("peer_wait_s"):
            f = transport.recv(src, wait, stage.limits.data_bytes(rows, T, head))
    except (PeerError, BadFrame) as e:  # told downstream, so rank 0 names the right node
        return None, str(e), True
    if f.kind == Kind.ERROR:
        return None, _text(f), bool(f.args[2])
    x = f.tensors[0] if len(f.tensors) == 1 or (head and len(f.tensors) == 2) else None
    good = f.kind == Kind.DATA and f.args[:2] == [cache_id, m] and x is not None
    if good and len(f.tensors) == 2:  # greedy ids (rows, 1) and their embedding rows
        e = f.tensors[1]
        good = x.dtype == torch.int64 and e.is_floating_point() and tuple(e.shape) == (
            rows, stage.limits.hidden) and x.shape == (rows, 1)  # fmt: skip
        if good:
            return (x, e), None, False
    if good and x.dim() in (2, 3) and len(x) == rows and (head or x.shape[1] == T):
        return x, None, False
    what = f"{f.kind.name} {f.args[:2]} {[tuple(t.shape) for t in f.tensors]}"
    return None, (f"node {stage.node.name}: rejected a frame from "
                  f"{stage.topology.nodes[src].name}: expected piece {m} of cache "
                  f"{cache_id}, ({rows}, {T}, ...), got {what}"), True  # fmt: skip


def _text(f: Frame) -> str:
    return decode_text(f.tensors[0]) if f.tensors else "unknown error"


def serve(stage: Stage, transport: Transport) -> bool:
    """A worker's loop for one job: follow rank 0's frames until SHUTDOWN (True) or until rank
    0 goes away (False). Errors in a forward are sent on, not raised: the job decides. A frame
    that breaks the protocol or the job's limits is refused with one log line and ends this job
    (the worker waits for the next), never the process."""
    wait = stage.topology.timeout * WORKER_WAIT
    name = stage.node.name
    while True:
        try:
            f = transport.recv(0, FOREVER, stage.limits.control_bytes())
            if f.kind == Kind.SHUTDOWN:
                return True
            if f.kind != Kind.FORWARD:
                _control(stage, f)
                continue
            positions, mask, last_only = _forward_frame(stage, f)
            _, _, lost = run_segments(stage, transport, f.args[0], positions, mask, last_only,
                                      None, wait, f.args[5])  # fmt: skip
            with stage.timed("send_wait_s"):
                transport.flush(wait)
            stage.end_step(transport)
            if lost:
                return False
        except PeerError as e:  # rank 0 or a neighbour died: this job is over for everyone
            print(f"layercake worker {name}: {e}", file=sys.stderr, flush=True)
            return False
        except LayercakeError as e:  # a bad frame or a request this job's limits refuse
            print(f"layercake worker {name}: frame refused, leaving this job: {e}",
                  file=sys.stderr, flush=True)  # fmt: skip
            return False


def _control(stage: Stage, f: Frame) -> None:
    one = len(f.tensors) == 1 and f.tensors[0].dim() == 1 and f.tensors[0].dtype == torch.int64
    if f.kind == Kind.NEW_CACHE and one and len(f.tensors[0]) <= stage.limits.max_batch:
        stage.new_cache(f.args[0], f.tensors[0].tolist(), f.args[1])
    elif f.kind == Kind.SELECT and one:
        stage.select(f.args[0], f.tensors[0])
    else:
        shapes = [tuple(t.shape) for t in f.tensors]
        raise BadFrame(f"node {stage.node.name}: unexpected {f.kind.name} frame {shapes}")


def _forward_frame(stage: Stage, f: Frame) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """FORWARD's positions and mask, checked against the live cache and the job's limits."""
    stage.check(f.args[0])
    T, last_only, has_mask, ids_only, chunks = f.args[1:6]
    stage.ids_only = bool(ids_only and last_only)
    want = (sum(stage.sizes), T)
    types = [torch.int64] + ([torch.uint8] if has_mask else [])
    ok = 0 < T <= stage.limits.max_context and len(f.tensors) == len(types) and 0 < chunks <= T
    if not ok or any(tuple(t.shape) != want or t.dtype != d for t, d in zip(f.tensors, types)):
        shapes = [tuple(t.shape) for t in f.tensors]
        raise BadFrame(f"node {stage.node.name}: FORWARD frame {shapes} does not fit the "
                       f"cache's {want[0]} rows (T={T}, max_context "
                       f"{stage.limits.max_context})")  # fmt: skip
    return f.tensors[0], (f.tensors[1].bool() if has_mask else None), bool(last_only)

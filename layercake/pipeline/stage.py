"""One pipeline stage: a node's segments of the model, each a Runner (resident, or offloaded with
the node's own budgets), their KV caches per micro-batch, and the worker loop
(receive -> forward -> send) that rank 0's ``PipelineRunner`` drives.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from layercake.config import BaseConfig
from layercake.errors import LayercakeError
from layercake.kv_cache import KVCache
from layercake.models.parts import Parts
from layercake.pipeline.topology import Segment, Topology
from layercake.pipeline.transport import FOREVER, Frame, Kind, PeerError, Transport, encode_text

WORKER_WAIT = 0.8  # of the job's timeout: a worker reports a silent peer before rank 0 gives up


class Stage:
    """The segments of the path that ``rank`` holds, ready to run, and their caches."""

    def __init__(self, topology: Topology, rank: int, ckpt: Any, config: BaseConfig,
                 source: Path, dtype: str | torch.dtype | None = None) -> None:  # fmt: skip
        from layercake.devices import parse_device, parse_dtype

        self.topology, self.rank = topology, rank
        self.node = topology.nodes[rank]
        self.device = parse_device(self.node.device)
        self.dtype = parse_dtype(self.node.options.get("dtype", dtype), self.device)
        self.segments = topology.segments(rank)
        self.runners = {s.index: self._runner(ckpt, config, source, s.parts) for s in self.segments}
        self.cache_id = -1
        self.sizes: list[int] = []
        self.caches: dict[int, list[KVCache]] = {}  # segment index -> one cache per micro-batch

    def _runner(self, ckpt: Any, config: BaseConfig, source: Path, parts: Parts) -> Any:
        from layercake.options import Options
        from layercake.runners import build_runner

        o = self.node.options
        keys = ("percent", "cpu_memory", "device_memory", "offload_dir", "batch_size",
                "num_batches", "max_context")  # fmt: skip
        options = Options(device=self.device, dtype=self.dtype, **{k: o.get(k) for k in keys})
        return build_runner(options, ckpt, config, source, parts)

    def new_cache(self, cache_id: int, sizes: list[int], capacity: int) -> None:
        """One cache per micro-batch per segment; replaces the previous job's caches."""
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
        """Range streaming: once ``seg`` is done, start reading the next held range's first
        streamed weights (an offloaded segment's disk rows) while the other nodes compute. The
        ring wraps: after the last range, the first one's for the next step."""
        i = self.segments.index(seg)
        nxt = self.segments[(i + 1) % len(self.segments)]
        loader = getattr(self.runners[nxt.index], "loader", None)
        if nxt is not seg and loader is not None:
            loader.submit(0)

    @torch.inference_mode()
    def run(self, seg: Segment, m: int, x: torch.Tensor, positions: torch.Tensor,
            mask: torch.Tensor | None, last_only: bool) -> torch.Tensor:  # fmt: skip
        if x.is_floating_point():
            x = x.to(self.device, self.dtype)
        if mask is None:  # (B, T): a runner would shape its default after hidden states
            mask = torch.ones(positions.shape, dtype=torch.bool)
        out = self.runners[seg.index].forward(
            x, positions, self.caches[seg.index][m], mask, last_only
        )
        return out if seg.parts.head else out.to(self.dtype)


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


def run_segments(stage: Stage, transport: Transport, cache_id: int, positions: torch.Tensor,
                 mask: torch.Tensor | None, last_only: bool, inputs: list[torch.Tensor] | None,
                 wait: float) -> tuple[list[torch.Tensor], str | None, bool]:  # fmt: skip
    """Run this rank's segments in path order, every micro-batch in turn: receive (or take
    ``inputs`` for the path's first segment), compute, send on. A failure upstream or here
    travels on as an ERROR frame in place of the output, so every peer stays in step. Returns
    the outputs of a final segment held here (the logits on rank 0), the first error, and
    whether a peer was lost (the job cannot go on)."""
    name = stage.node.name
    pos_m = positions.split(stage.sizes)
    mask_m = mask.split(stage.sizes) if mask is not None else [None] * len(stage.sizes)
    error: str | None = None
    lost = False
    finals: list[torch.Tensor] = []
    last = len(stage.topology.path) - 1
    for seg in stage.segments:
        prev, nxt = neighbours(stage.topology, seg)
        for m in range(len(stage.sizes)):
            out = msg = None
            if seg.index == 0 and inputs is not None:
                x = inputs[m]
            else:
                try:
                    f = transport.recv(prev, wait)
                except PeerError as e:  # told downstream, so rank 0 names the right node
                    f, lost = None, True
                    msg, x = str(e), None
                if f is None:
                    pass
                elif f.kind == Kind.ERROR:
                    msg, x = _text(f), None
                    lost = lost or bool(f.args[2])
                elif f.kind != Kind.DATA or f.args[:2] != [cache_id, m]:
                    raise LayercakeError(f"node {name}: out-of-step frame {f.kind.name} {f.args}")
                else:
                    x = f.tensors[0]
            if msg is None:
                try:
                    out = stage.run(seg, m, x, pos_m[m], mask_m[m], last_only)
                except Exception as e:  # the job fails; the peers are told so, then rank 0 raises
                    msg = f"node {name}: {type(e).__name__}: {e}" if not isinstance(
                        e, LayercakeError) else f"node {name}: {e}"  # fmt: skip
            error = error or msg
            if seg.index == last and nxt == stage.rank:
                finals.append(out if out is not None else torch.empty(0))
            elif msg is not None:
                transport.send(nxt, Kind.ERROR, (cache_id, m, int(lost)), [encode_text(msg)])
            else:
                transport.send(nxt, Kind.DATA, (cache_id, m), [out])
        stage.prefetch_after(seg)
    return finals, error, lost


def _text(f: Frame) -> str:
    from layercake.pipeline.transport import decode_text

    return decode_text(f.tensors[0]) if f.tensors else "unknown error"


def serve(stage: Stage, transport: Transport) -> bool:
    """A worker's loop for one job: follow rank 0's frames until SHUTDOWN (True) or until rank
    0 goes away (False). Errors in a forward are sent on, not raised: the job decides."""
    wait = stage.topology.timeout * WORKER_WAIT
    while True:
        try:
            f = transport.recv(0, FOREVER)
        except PeerError:
            return False
        if f.kind == Kind.SHUTDOWN:
            return True
        cache_id = f.args[0]
        if f.kind == Kind.NEW_CACHE:
            stage.new_cache(cache_id, f.tensors[0].tolist(), f.args[1])
        elif f.kind == Kind.SELECT:
            stage.select(cache_id, f.tensors[0])
        elif f.kind == Kind.FORWARD:
            T, last_only, has_mask = f.args[1:4]
            positions = f.tensors[0]
            mask = f.tensors[1].bool() if has_mask else None
            try:
                stage.check(cache_id)
                _, _, lost = run_segments(stage, transport, cache_id, positions, mask,
                                          bool(last_only), None, wait)  # fmt: skip
                transport.flush(wait)
                if lost:
                    return False
            except PeerError as e:  # a neighbour died: this job is over for everyone
                print(f"layercake worker {stage.node.name}: {e}", file=sys.stderr, flush=True)
                return False
        else:
            raise LayercakeError(f"node {stage.node.name}: unexpected frame {f.kind.name}")

"""Rank 0 of a pipeline: ``PipelineRunner``, the Runner (``new_cache`` / ``forward``) that drives
the workers, so ``LLM.generate`` runs unchanged; and ``run_worker``, what ``layercake worker``
runs on every other node.

A forward splits the batch's rows into micro-batches and a prompt's tokens into chunks (the
pieces): rank 0 runs its first segment on piece p and sends it on while the next node computes
p-1, and so on down the path; the last segment's logits (or, for a greedy generation, each row's
argmax id) come back to rank 0. Each node keeps the KV cache of its own layers, one per
micro-batch, under the cache id rank 0 hands out.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from layercake.config import BaseConfig
from layercake.errors import LayercakeError
from layercake.kv_cache import KVCache
from layercake.models.tied import runner_embedding
from layercake.offload.tiers import mapped_empty
from layercake.pipeline.node import memory_plan
from layercake.pipeline.rendezvous import host_job, join_job, leave_job
from layercake.pipeline.stage import Stage, pieces, receive, run_segments, serve
from layercake.pipeline.topology import Topology, load_topology
from layercake.pipeline.transport import Kind, PeerError

# the logits of every token but a greedy row's id: finite, so that the sampler's check for
# NaN and inf is its one pass (with -inf it took ~6 vocabulary-sized passes over the batch
# instead: 40-47 ms a step for 32 rows x 128256 on one core, against 4-6 ms), and still zero
# weight in any softmax
NOT_CHOSEN = -1e30


class PipelineCache:
    """A handle: the caches live on the nodes (rank 0's in its ``Stage``), under ``cache_id``."""

    def __init__(self, runner: PipelineRunner, cache_id: int, batch: int, capacity: int) -> None:
        self.runner, self.cache_id = runner, cache_id
        self.batch, self.capacity = batch, capacity

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (drop finished sequences), on every node."""
        self.runner._select(self, rows)


class PipelineRunner:
    """The Runner of a job whose stages run on the topology's nodes (this process is rank 0)."""

    def __init__(self, topology: Topology, stage: Stage, config: BaseConfig,
                 transport: Any, store: Any, micro_batches: int | None = None) -> None:  # fmt: skip
        self.topology, self.stage, self.config = topology, stage, config
        self.transport, self._store = transport, store
        self.device = stage.device
        self.vocab_size = config.vocab_size
        self.max_context = config.max_position_embeddings
        self.block_size: int | None = None
        # an offloaded stage streams its weights once per call: micro-batches would multiply its
        # disk reads (measured: 4.5 tok/s with 1, 3.5 with 2, 2.3 with 4 in benchmarks/pipeline)
        default = 1 if any(n.offloaded for n in topology.nodes) else len(topology.nodes)
        self.micro_batches = micro_batches or topology.micro_batches or default
        # a prompt's tokens in chunks: node k runs chunk c while node k+1 runs chunk c-1
        self.prefill_chunks = topology.chunks
        self.workers = list(range(1, len(topology.nodes)))
        self._next_id = 0
        self.failed: LayercakeError | None = None
        self.forwards = 0  # passes through the pipeline (one per forward call)
        self._sampler: Any = None
        self._log: list[tuple[str, tuple]] = []

    # ---- the Runner interface ---------------------------------------------------------------
    def new_cache(self, batch: int, capacity: int) -> PipelineCache:
        self._alive()
        cache = PipelineCache(self, 0, batch, capacity)
        self._open(cache)
        self._sampler = None  # a generation over this cache hands over its own (use_sampler)
        self._log: list[tuple[str, tuple]] = []  # what was done to it since: replayed on resume
        return cache

    def _open(self, cache: PipelineCache) -> None:
        """(Re)create ``cache`` under a new id on every node."""
        batch, capacity = cache.batch, cache.capacity
        m = max(1, min(self.micro_batches, batch))
        sizes = [batch // m + (i < batch % m) for i in range(m)]
        why = self.stage.limits.cache(sizes, capacity)
        if why:
            raise LayercakeError(f"pipeline: a cache of {batch} rows x {capacity} slots exceeds "
                                 f"this job's limits ({why}): raise max_batch / max_context in "
                                 f"{self.topology.source}")  # fmt: skip
        self._next_id += 1
        cid = cache.cache_id = self._next_id
        self._guard(lambda: self._broadcast(Kind.NEW_CACHE, (cid, capacity), [torch.tensor(sizes)]))
        self.stage.new_cache(cid, sizes, capacity)

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,  # (B, T)
        positions: torch.Tensor,  # (B, T)
        cache: PipelineCache | KVCache,
        token_mask: torch.Tensor | None = None,  # (B, T) False = padding
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T or 1, vocab) fp32 on rank 0's device."""
        self._alive()
        if not isinstance(cache, PipelineCache) or cache.runner is not self:
            raise LayercakeError("a pipeline runs with a cache from its own new_cache()")
        self.stage.check(cache.cache_id)
        mask = None if token_mask is None else token_mask.cpu().clone()
        args = (tokens.cpu().clone(), positions.cpu().clone(), mask, last_only)  # they mutate
        out = self._resilient(cache, lambda: self._forward(args[0], args[1], cache, *args[2:]))
        self._log.append(("forward", args))
        return out

    def _resilient(self, cache: PipelineCache, fn: Any) -> Any:
        """``fn``; with the topology's ``resume_timeout``, a lost worker that comes back in time
        (restarted) is reconnected, the cache rebuilt by replaying its steps, and ``fn`` run
        again: the job goes on with the same tokens."""
        try:
            return self._guard(fn)
        except LayercakeError:
            wait = self.topology.resume_timeout
            if not wait or self.failed is None:
                raise
            lost = self.failed
            name = self.topology.nodes[0].name
            print(f"layercake {name}: {lost}; waiting up to {wait:.0f} s for it to rejoin",
                  file=sys.stderr, flush=True)  # fmt: skip
            try:
                self.reconnect(wait)
            except LayercakeError as e:
                self.failed = LayercakeError(f"{lost} (not back within {wait:.0f} s: {e})")
                raise self.failed from None
            first = self._log[0][1] if self._log else None
            cache.batch = len(first[0]) if first else cache.batch
            self._open(cache)
            for kind, args in self._log:
                if kind == "forward":
                    self._guard(lambda a=args: self._forward(a[0], a[1], cache, *a[2:]))
                else:
                    self._guard(lambda a=args: self._do_select(cache, a[0]))
            print(f"layercake {name}: rejoined; {len(self._log)} steps replayed",
                  file=sys.stderr, flush=True)  # fmt: skip
            return self._guard(fn)

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: PipelineCache,
                 mask: torch.Tensor | None, last_only: bool) -> torch.Tensor:  # fmt: skip
        cid, T = cache.cache_id, tokens.shape[1]
        tokens, positions = tokens.cpu(), positions.cpu()
        mask = mask.cpu().expand(tokens.shape) if mask is not None else None
        control = [positions] + ([mask] if mask is not None else [])
        ids_only = last_only and self._greedy()
        self.stage.ids_only = ids_only
        chunks = min(T, self.prefill_chunks) if T > 1 else 1
        args = (cid, T, int(last_only), int(mask is not None), int(ids_only), chunks)
        self._broadcast(Kind.FORWARD, args, control)
        sizes = self.stage.sizes
        path = self.topology.path
        plan = pieces(sizes, T, chunks)
        emb = self._embedding()
        if emb is not None:  # every piece's rows read together, not chunk by chunk
            emb.prefetch(tokens)
        rows = tokens.split(sizes)
        inputs = [rows[m][:, t0:t1] for m, t0, t1 in plan]
        t = self.transport
        if path[0].rank != 0:  # the embeddings live elsewhere: token ids travel there
            for p, x in enumerate(inputs):
                t.send(path[0].rank, Kind.DATA, (cid, p), [x])
        finals, error, lost = run_segments(self.stage, t, cid, positions, mask, last_only, inputs,
                                        self.topology.timeout, chunks)  # fmt: skip
        if path[-1].rank != 0:  # the head lives elsewhere: collect its logits (or ids)
            pos = positions.split(sizes)
            for p, (m, t0, t1) in enumerate(plan):
                x, msg, gone = receive(self.stage, t, path[-1].rank, cid, p,
                                       pos[m][:, t0:t1].shape, self.topology.timeout,
                                       head=True)  # fmt: skip
                error, lost = error or msg, lost or gone
                finals.append(x)
        if error:
            t.drop_pending()
            raise PeerError(error, "") if lost else LayercakeError(error)
        with self.stage.timed("send_wait_s"):
            t.flush()
        self.forwards += 1
        self.stage.end_step(t)
        finals = self._take_rows(finals)
        out = _assemble(finals, plan, T, last_only)
        if ids_only:  # what the greedy sampler needs from the logits: their argmax
            ids = out.view(-1, 1, 1)
            shape = (len(ids), 1, self.vocab_size)
            # a mapping of its own, gone when the caller drops it (``mapped_empty``)
            logits = (mapped_empty(shape, torch.float32) if self.device.type == "cpu"
                      else torch.empty(shape, device=self.device))  # fmt: skip
            return logits.fill_(NOT_CHOSEN).scatter_(2, ids.to(self.device), 0.0)
        return out.to(self.device, torch.float32)

    def _embedding(self) -> Any:
        """The token embedding this process holds (rank 0 runs the path's first segment), or
        None."""
        first = self.topology.path[0]
        return runner_embedding(self.stage.runners[first.index]) if first.rank == 0 else None

    def _take_rows(self, finals: list[Any]) -> list[Any]:
        """The head's ids without the embedding rows that came with them (a tied head), which
        rank 0's embeddings keep for the next step's lookup (``Embedding.remember``)."""
        emb = self._embedding()
        out = []
        for f in finals:
            if isinstance(f, tuple):
                ids, rows = f
                if emb is not None:
                    emb.remember(dict(zip(ids.view(-1).tolist(), rows.unbind())))
                f = ids
            out.append(f)
        return out

    def use_sampler(self, sampler: Any) -> None:
        """The sampler of the current cache's generation: when every row is greedy and wants no
        logprobs, the head's node sends back each row's argmax id instead of its logits."""
        self._sampler = sampler

    def _greedy(self) -> bool:
        s = self._sampler
        return (s is not None and set(s.groups) == {"greedy"} and s.history is None
                and not s.logprob_rows)  # fmt: skip

    def _select(self, cache: PipelineCache, rows: torch.Tensor) -> None:
        self._alive()
        self.stage.check(cache.cache_id)
        rows = rows.cpu().to(torch.int64)
        self._resilient(cache, lambda: self._do_select(cache, rows))
        self._log.append(("select", (rows,)))

    def _do_select(self, cache: PipelineCache, rows: torch.Tensor) -> None:
        self._broadcast(Kind.SELECT, (cache.cache_id,), [rows])
        self.stage.select(cache.cache_id, rows)
        cache.batch = len(rows)

    # ---- plumbing ---------------------------------------------------------------------------
    def _broadcast(self, kind: Kind, args: tuple[int, ...], tensors: list[torch.Tensor]) -> None:
        for w in self.workers:
            self.transport.send(w, kind, args, tensors)

    def _guard(self, fn: Any) -> Any:
        """A lost or silent worker ends the job: the error names it and every later call
        repeats it (reconnect with ``reconnect()`` once the worker is back)."""
        try:
            return fn()
        except PeerError as e:
            self.failed = LayercakeError(f"pipeline job ended: {e}")
            self.transport.drop_pending()
            raise self.failed from None

    def _alive(self) -> None:
        if self.failed is not None:
            raise self.failed
        if self.transport is None:
            raise LayercakeError("this pipeline was closed: load it again")

    @property
    def stats(self) -> dict[str, int]:
        t = self.transport
        return dict(bytes_sent=t.bytes_sent, bytes_received=t.bytes_received,
                    frames_sent=t.frames_sent, frames_received=t.frames_received,
                    forwards=self.forwards)  # fmt: skip

    def close(self) -> None:
        """Tell the workers this job is over (they wait for the next) and leave the group."""
        self._leave()
        self._store = None

    def _leave(self) -> None:
        if self.transport is None:
            return
        if self.failed is None:
            try:
                self._broadcast(Kind.SHUTDOWN, (), [])
                self.transport.flush(5.0)
            except (PeerError, LayercakeError):
                pass
        leave_job()
        self.transport = None

    def reconnect(self, timeout: float | None = None) -> None:
        """After a failure: wait for every worker to join again (e.g. the restarted one; up to
        ``timeout`` s, default the topology's connect_timeout) and go on with a fresh group;
        caches are gone, so a batch job resumes from its last result."""
        if self._store is None:
            raise LayercakeError("this pipeline was closed: load it again")
        self._leave()
        topo = self.topology if timeout is None else replace(self.topology, connect_timeout=timeout)
        self.transport, self._store = host_job(topo, *self._identity, store=self._store)
        self.failed = None


def _assemble(finals: list[torch.Tensor], plan: list[tuple[int, int, int]], T: int,
              last_only: bool) -> torch.Tensor:  # fmt: skip
    """The head's outputs per piece -> (B, T or 1, ...): each micro-batch's chunks joined along
    the tokens (``last_only``: its last chunk alone), the micro-batches along the rows."""
    per_m: list[list[torch.Tensor]] = []
    for p, (_, t0, t1) in enumerate(plan):
        if t0 == 0:
            per_m.append([])
        if not last_only or t1 == T:
            per_m[-1].append(finals[p])
    rows = [parts[0] if len(parts) == 1 else torch.cat(parts, 1) for parts in per_m]
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def pipeline_runner(topology: str | os.PathLike | Topology, ckpt: Any, config: BaseConfig,
                    source: Path, dtype: str | torch.dtype | None = None,
                    micro_batches: int | None = None) -> PipelineRunner:  # fmt: skip
    """Rank 0: load this node's segments, wait for the workers, return the runner."""
    from layercake.pipeline.split import model_id

    topo = load_topology(topology, config.num_hidden_layers)
    rank = int(os.environ.get("RANK", "0"))
    if rank > 0:  # under torchrun every process runs the job's command: the others serve
        run_worker(topo, None, str(source), once=True)
        raise SystemExit(0)
    stage = Stage(topo, 0, ckpt, config, source, dtype)
    identity = (model_id(source), str(source))
    transport, store = host_job(topo, *identity)
    runner = PipelineRunner(topo, stage, config, transport, store, micro_batches)
    runner._identity = identity
    return runner


def run_worker(topology: str | os.PathLike | Topology, name: str | None, model: str | None = None,
               once: bool = False, connect_timeout: float | None = None,
               threads: int | None = None) -> None:  # fmt: skip
    """``layercake worker``: load this node's layers once, then serve jobs (rejoin after each)."""
    from layercake.checkpoint import open_checkpoint
    from layercake.config import load_config
    from layercake.pipeline.rendezvous import hold_address
    from layercake.pipeline.split import model_id

    topo = load_topology(topology)
    if name is None:  # under torchrun: the node at this process's rank
        if "RANK" not in os.environ:
            raise LayercakeError("worker needs --name NODE (or RANK set, as torchrun does)")
        rank = int(os.environ["RANK"])
        if not 0 < rank < len(topo.nodes):
            raise LayercakeError(f"RANK={rank} is not a worker of {topo.source}")
        name = topo.nodes[rank].name
    rank = topo.rank(name)
    if rank == 0:
        raise LayercakeError(
            f"{name} is rank 0, where the job runs: start it with `layercake generate --topology "
            f"{topo.source}` (or the Python API), and `layercake worker` on the other nodes"
        )
    node = topo.nodes[rank]
    path = model or node.options.get("model") or topo.model
    if path is None:
        raise LayercakeError(f"node {name}: no model: pass --model or set 'model' in the topology")
    source = Path(path).expanduser()
    held = hold_address(node)  # noqa: F841  (held for the life of the worker)
    threads = threads or node.options.get("threads")
    if threads:
        torch.set_num_threads(threads)
    ckpt = open_checkpoint(source)
    config = load_config(ckpt.config_dict())
    topo.check(config.num_hidden_layers)
    t0 = time.perf_counter()
    stage = Stage(topo, rank, ckpt, config, source)
    ident = model_id(source)
    took = time.perf_counter() - t0
    log = f"layercake worker {name}: layers '{node.layers}' loaded in {took:.1f} s"
    log += f"; memory (MB) {json.dumps(memory_plan(stage.runners, stage.pool))}"
    print(log, file=sys.stderr, flush=True)
    while True:
        transport, store = join_job(topo, rank, ident, str(source), connect_timeout)
        print(f"layercake worker {name}: joined the job", file=sys.stderr, flush=True)
        clean = serve(stage, transport)
        leave_job()
        del store
        how = "done" if clean else "ended (rank 0 or a peer left)"
        print(f"layercake worker {name}: job {how}; time {json.dumps(stage.report())}",
              file=sys.stderr, flush=True)  # fmt: skip
        if once:
            return

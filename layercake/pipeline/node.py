"""A pipeline node's segments as runners: the options each is built with (the node's budgets,
and the length of the passes it is sent, which its activations are planned for), the pool its
ranges share when it holds several under one ``cpu_memory`` (range streaming, ``pool``), and
where its memory goes (``memory_plan``, logged by every node once its layers are loaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from layercake.config import BaseConfig
from layercake.errors import LayercakeError
from layercake.models.parts import Parts
from layercake.pipeline.pool import RangePool
from layercake.pipeline.topology import Node, Topology

OPTION_KEYS = ("percent", "device_memory", "offload_dir", "batch_size", "num_batches",
               "max_context")  # fmt: skip
PREFIX_MIN = 1 << 20  # bytes beside the slots worth keeping units' first bytes in
STREAM_ALL = (0, 0, 100, 0, 100, 0)  # a pooled range: weights on disk, KV and activations in RAM


def pass_tokens(topology: Topology, context: int) -> int:
    """The most tokens per sequence one pass through a node brings: rank 0 sends a prompt of at
    most ``context`` tokens in ``topology.chunks`` pieces, and a decode step one token."""
    return max(1, -(-context // topology.chunks))


def segment_runner(topology: Topology, node: Node, device: torch.device, dtype: torch.dtype,
                   ckpt: Any, config: BaseConfig, source: Path, parts: Parts,
                   cpu_memory: int | str | None, max_context: int,
                   percent: tuple[float, ...] | None = None) -> Any:  # fmt: skip
    """The Runner of one segment of ``node`` (the one factory): offloaded with the node's
    budgets (``cpu_memory``; ``percent``: a placement instead), its activations planned for the
    prompt's pieces rather than whole prompts; else resident."""
    from layercake.options import Options
    from layercake.runners import build_runner

    kw = {k: node.options.get(k) for k in OPTION_KEYS}
    kw["percent"] = percent or kw["percent"]
    context = kw["max_context"] or max_context
    options = Options(device=device, dtype=dtype, cpu_memory=cpu_memory,
                      pass_tokens=pass_tokens(topology, context), **kw)  # fmt: skip
    return build_runner(options, ckpt, config, source, parts)


def build_runners(stage: Any, ckpt: Any, config: BaseConfig, source: Path
                  ) -> tuple[dict[int, Any], RangePool | None]:  # fmt: skip
    """A stage's runners by segment index, and the pool of its ranges: a node holding several
    ranges under one ``cpu_memory`` (without ``percent``) streams every range's weights through
    one pool of slots its budget holds (``range_pool``); a node with one range plans it with its
    whole budget."""
    node, segs = stage.node, stage.segments
    budget = node.options.get("cpu_memory")

    def build(parts: Parts, cpu: Any, percent: Any = None) -> Any:
        return segment_runner(stage.topology, node, stage.device, stage.dtype, ckpt, config,
                              source, parts, cpu, stage.limits.max_context, percent)  # fmt: skip

    if budget is None or len(segs) == 1 or node.options.get("percent") is not None:
        return {s.index: build(s.parts, budget) for s in segs}, None
    runners = {s.index: build(s.parts, None, STREAM_ALL) for s in segs}
    return runners, range_pool(stage, ckpt, config, runners, budget)


def range_pool(stage: Any, ckpt: Any, config: BaseConfig, runners: dict[int, Any],
               budget: int | str) -> RangePool:  # fmt: skip
    """One pool of staging slots for all of a node's ranges: as many slots of its largest
    streamed unit as ``budget`` (the whole process) leaves beside the process, the margin, the
    KV cache of every range, and the largest range's activations and scratch; never more than
    the node's units. Each range's runner reads through its view of the pool."""
    from layercake.offload.executor import trim_heap
    from layercake.offload.footprint import SAFETY, footprint, process_rss
    from layercake.offload.policy import STAGING_SLOTS, parse_bytes
    from layercake.offload.tiers import ALIGN, host_buffer

    o, name = stage.node.options, stage.node.name
    context = o.get("max_context") or stage.limits.max_context
    sources, fixed = {}, {"kv_cache": 0, "activations": 0, "scratch": 0}
    for pos, s in enumerate(stage.segments):
        r = runners[s.index]
        if not s.parts.layers and not s.parts.head:  # the embeddings alone: nothing streams
            continue
        fp = footprint(ckpt, config, s.parts, stage.dtype, o.get("batch_size") or 32,
                       o.get("num_batches") or 1, context, int4pack=stage.device.type == "cpu",
                       pass_tokens=pass_tokens(stage.topology, context))  # fmt: skip
        r.memory = {"kv_cache": fp.kv, "activations": fp.activations, "scratch": fp.work}
        fixed["kv_cache"] += fp.kv  # every range keeps its cache; one pass runs at a time
        fixed["activations"] = max(fixed["activations"], fp.activations)
        fixed["scratch"] = max(fixed["scratch"], fp.work)
        if fp.expert_staging:  # routed experts read through each range's own ring
            fixed["expert_staging"] = fixed.get("expert_staging", 0) + fp.expert_staging
        if r.loader is not None:
            sources.update({(pos, j): (r.loader.readers[j], *rng)
                            for j, rng in r.loader.ranges.items()})  # fmt: skip
    slot = max(length for _, _, length in sources.values()) + ALIGN
    trim_heap()  # what loading freed: the slots are whole units, and a few MB can make one
    base = process_rss() + SAFETY
    free = parse_bytes(budget) - base - sum(fixed.values())
    n = min(len(sources), max(0, free) // slot)
    if n < STAGING_SLOTS:
        raise LayercakeError(
            f"node {name}: cpu_memory {budget} leaves {free / 1e6:.0f} MB for the weights of "
            f"its ranges ({base / 1e6:.0f} MB process and margin, {fixed['kv_cache'] / 1e6:.0f} "
            f"MB KV cache, {(fixed['activations'] + fixed['scratch']) / 1e6:.0f} MB activations"
            f" and scratch): streaming them needs {STAGING_SLOTS} slots of {slot / 1e6:.0f} MB"
        )
    # what whole slots leave keeps the first bytes of the units read last in a cycle
    rest = (free - n * slot) // ALIGN * ALIGN if n < len(sources) else 0
    prefix = host_buffer(rest) if rest >= PREFIX_MIN else None
    pool = RangePool([host_buffer(slot) for _ in range(n)], sources, lead=n, prefix=prefix)
    pool.memory = dict(process_and_safety=base, pool=n * slot, **fixed)
    if prefix is not None:
        pool.memory["prefix"] = len(prefix)
    for pos, s in enumerate(stage.segments):
        r = runners[s.index]
        if r.loader is not None:
            r.loader = pool.view(pos, r.loader.ranges)
    return pool


def memory_plan(runners: dict[int, Any], pool: RangePool | None = None) -> dict[str, Any]:
    """Where a node's memory goes, per segment (MB): an offloaded one's plan (``process_and_safety``
    = the process when it was built + the safety margin, resident ``weights``, ``staging``
    buffers of the streamed share, ``scratch``, ``kv_cache``, ``activations``) and the weight
    bytes it reads per pass; a resident one is marked so."""
    out: dict[str, Any] = {}
    for index, r in sorted(runners.items()):
        mb = {k: round(v / 1e6, 1) for k, v in (getattr(r, "memory", None) or {}).items()}
        units = getattr(r, "units", None)
        if units is not None:
            weights = sum(u.nbytes for u in units)
            disk = getattr(r, "disk_bytes", 0)
            mb.update(weights_total=round(weights / 1e6, 1), streamed=round(disk / 1e6, 1))
        else:
            mb["resident"] = True
        out[str(index)] = mb
    if pool is not None:  # the node's ranges share it: one range's weights at a time, or more
        out["pool"] = {k: round(v / 1e6, 1) for k, v in pool.memory.items()}
        out["pool"].update(slots=len(pool.slots), slot_mb=round(len(pool.slots[0]) / 1e6, 1))
    return out

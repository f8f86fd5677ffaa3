"""A pipeline node's segments as runners: the options each is built with (the node's budgets,
and the length of the passes it is sent, which its activations are planned for) and where its
memory goes (``memory_plan``, logged by every node once its layers are loaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from layercake.config import BaseConfig
from layercake.models.parts import Parts
from layercake.pipeline.topology import Node, Topology

OPTION_KEYS = ("percent", "device_memory", "offload_dir", "batch_size", "num_batches",
               "max_context")  # fmt: skip


def pass_tokens(topology: Topology, context: int) -> int:
    """The most tokens per sequence one pass through a node brings: rank 0 sends a prompt of at
    most ``context`` tokens in ``topology.chunks`` pieces, and a decode step one token."""
    return max(1, -(-context // topology.chunks))


def segment_runner(topology: Topology, node: Node, device: torch.device, dtype: torch.dtype,
                   ckpt: Any, config: BaseConfig, source: Path, parts: Parts,
                   cpu_memory: int | str | None, max_context: int) -> Any:  # fmt: skip
    """The Runner of one segment of ``node`` (the one factory): offloaded with the node's
    budgets (``cpu_memory``: this segment's share), its activations planned for the prompt's
    pieces rather than whole prompts; else resident."""
    from layercake.options import Options
    from layercake.runners import build_runner

    kw = {k: node.options.get(k) for k in OPTION_KEYS}
    context = kw["max_context"] or max_context
    options = Options(device=device, dtype=dtype, cpu_memory=cpu_memory,
                      pass_tokens=pass_tokens(topology, context), **kw)  # fmt: skip
    return build_runner(options, ckpt, config, source, parts)


def memory_plan(runners: dict[int, Any]) -> dict[str, Any]:
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
    return out

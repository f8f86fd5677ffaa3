"""The planner's model of mixture-of-experts routing: pure functions, no torch.

A step runs a block of B rows through each MoE layer; each row picks ``k`` of ``E`` experts.
With ``p[e]`` the chance that a row selects expert e (the marginal of its top-k, so the p sum
to k, each at most 1) and rows independent, expert e is needed by the step with probability
1 - (1 - p[e])^B, so a layer needs sum_e 1 - (1 - p[e])^B distinct experts; uniform routing
(p = k/E) gives E x (1 - (1 - k/E)^B): k at B=1, nearly all E at large B. The experts held in
RAM are the hottest ones (largest p, from routing counts observed at run time); the rest are
read from disk once per step when needed, so a step reads sum over cold e of (1 - (1-p)^B)
experts per layer, and a row's selections are served from RAM at the resident share of p.

``predict`` turns that into bytes read, step time (max of disk time and compute, the loader
reading while experts compute, as the dense planner's unit cost), throughput and memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


def uniform_probs(num_experts: int, top_k: int) -> list[float]:
    """Each expert selected by a row with probability k/E."""
    if not 0 < top_k <= num_experts:
        raise ValueError(f"top_k must be in 1..{num_experts}, got {top_k}")
    return [top_k / num_experts] * num_experts


def probs_from_counts(counts: Sequence[float], top_k: int) -> list[float]:
    """Selection probabilities per row from observed routing counts (selections per expert):
    scaled to sum to k, each capped at 1 (an expert cannot be picked twice by one row)."""
    total = float(sum(counts))
    if total <= 0:
        return uniform_probs(len(counts), top_k)
    return [min(1.0, top_k * c / total) for c in counts]


def expected_distinct(probs: Sequence[float], rows: int) -> float:
    """Expected number of distinct experts a block of ``rows`` rows selects in one layer."""
    return sum(1.0 - (1.0 - p) ** rows for p in probs)


def expected_distinct_uniform(num_experts: int, top_k: int, rows: int) -> float:
    """E x (1 - (1 - k/E)^B)."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** rows)


def hottest(probs: Sequence[float], resident: int) -> list[int]:
    """Indices of the ``resident`` most selected experts (held in RAM)."""
    order = sorted(range(len(probs)), key=lambda e: (-probs[e], e))
    return order[: max(0, min(resident, len(probs)))]


def hit_rate(probs: Sequence[float], resident: int) -> float:
    """Share of a row's selections served by the ``resident`` hottest experts held in RAM."""
    total = sum(probs)
    return sum(probs[e] for e in hottest(probs, resident)) / total if total else 0.0


def expected_cold_reads(probs: Sequence[float], rows: int, resident: int) -> float:
    """Expected distinct experts read from disk per layer and step: the needed ones not held."""
    held = set(hottest(probs, resident))
    return sum(1.0 - (1.0 - p) ** rows for e, p in enumerate(probs) if e not in held)


@dataclass(frozen=True)
class MoeShape:
    """What the model costs: bytes of one expert, of the always-run weights streamed per step
    (attention, router, shared experts, head: what is not held), parameter counts for FLOPs."""

    layers: int  # MoE layers
    num_experts: int
    top_k: int
    expert_bytes: int
    expert_params: int
    dense_params: int  # per token, outside the experts (attention, router, shared expert, head)
    dense_disk_bytes: int = 0  # of those, read from disk every step

    @property
    def checkpoint_expert_bytes(self) -> int:
        return self.layers * self.num_experts * self.expert_bytes


@dataclass(frozen=True)
class MoePrediction:
    rows: int
    resident_per_layer: int
    distinct_per_layer: float
    cold_reads_per_layer: float
    hit_rate: float
    bytes_per_step: float
    disk_s: float
    compute_s: float
    step_s: float
    tok_s: float
    resident_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def resident_experts(shape: MoeShape, budget_bytes: int) -> int:
    """Experts per layer the RAM budget left for experts holds (the same count in every layer:
    each layer's hottest)."""
    per_layer = shape.layers * shape.expert_bytes
    return max(0, min(shape.num_experts, budget_bytes // per_layer)) if per_layer else 0


def predict(
    shape: MoeShape,
    rows: int,
    probs: Sequence[float],
    resident: int,
    disk_gbps: float,
    gflops: float,
) -> MoePrediction:
    """One decode step of ``rows`` rows: experts needed and read, bytes, time and throughput.
    Compute is 2 FLOPs per weight per row for the dense part and per selected expert per row;
    the loader reads while experts compute, so the step costs the larger of the two."""
    if rows < 1 or disk_gbps <= 0 or gflops <= 0:
        raise ValueError("rows, disk rate and matmul rate must be positive")
    cold = expected_cold_reads(probs, rows, resident)
    nbytes = shape.layers * cold * shape.expert_bytes + shape.dense_disk_bytes
    disk_s = nbytes / (disk_gbps * 1e9)
    flops = 2 * rows * (shape.dense_params + shape.layers * shape.top_k * shape.expert_params)
    compute_s = flops / (gflops * 1e9)
    step = max(disk_s, compute_s)
    return MoePrediction(
        rows=rows,
        resident_per_layer=resident,
        distinct_per_layer=expected_distinct(probs, rows),
        cold_reads_per_layer=cold,
        hit_rate=hit_rate(probs, resident),
        bytes_per_step=nbytes,
        disk_s=disk_s,
        compute_s=compute_s,
        step_s=step,
        tok_s=rows / step,
        resident_bytes=shape.layers * resident * shape.expert_bytes,
    )


def throughput(prefill_s: float, step_s: float, rows: int, gen_len: int) -> float:
    """FlexGen's throughput: rows x generated tokens / (prefill + (gen_len - 1) decode steps)."""
    total = prefill_s + max(0, gen_len - 1) * step_s
    return rows * gen_len / total if total > 0 else math.inf

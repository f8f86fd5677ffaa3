"""The zig-zag block schedule as a pure generator (no torch): what the executor does, in order.

One forward pass of a block of ``num_batches`` micro-batches through ``num_units`` units (layers,
then slabs of the output head): each unit's weights are loaded once and serve every micro-batch
before the next unit (FlexGen's zig-zag order along the layer axis). Loads are issued ``lookahead``
units ahead, wrapping to the next forward pass, so a disk read overlaps the compute before it; a
micro-batch's KV cache is fetched while the previous micro-batch computes (the next unit's first
micro-batch during this unit's last one), and written back after.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

Kind = Literal["load", "wait", "load_cache", "compute", "store_cache", "free"]


@dataclass(frozen=True)
class Op:
    kind: Kind
    unit: int
    batch: int = -1  # micro-batch, for cache and compute ops


def zigzag(num_units: int, num_batches: int, lookahead: int = 1) -> Iterator[Op]:
    """The ops of one forward pass. ``load`` asks for a unit's weights (the executor may already
    have them in flight from the previous pass: it keeps the loads it issued); ``wait`` waits
    until they are ready; ``free`` hands the unit's staging memory back to the loader."""
    for j in range(min(lookahead, num_units) + 1):
        yield Op("load", j % num_units)
    for j in range(num_units):
        yield Op("wait", j)
        if j == 0:
            yield Op("load_cache", j, 0)
        for k in range(num_batches):
            if k + 1 < num_batches:
                yield Op("load_cache", j, k + 1)
            elif j + 1 < num_units:  # the next unit's first micro-batch: read during this one
                yield Op("load_cache", j + 1, 0)
            yield Op("compute", j, k)
            yield Op("store_cache", j, k)
        yield Op("free", j)
        nxt = j + lookahead + 1
        if nxt < num_units + lookahead + 1:
            yield Op("load", nxt % num_units)

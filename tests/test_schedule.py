"""The zig-zag schedule (``layercake/offload/schedule.py``): the order of loads, waits, cache
moves, computes and frees that the offload executor interprets, checked as a pure sequence, at
the lookahead production uses (``STAGING_SLOTS - 1``) and at the generator's default."""

from __future__ import annotations

import pytest

import layercake
from layercake.offload.policy import STAGING_SLOTS
from layercake.offload.schedule import Op, zigzag

LOOKAHEAD = STAGING_SLOTS - 1  # what the executor passes: one slot computing, the rest ahead


def check_pass(ops: list[Op], units: int, batches: int, in_flight: set[int], slots: int) -> None:
    """One forward pass against the invariants the executor and its loader rely on, with the
    loads still in flight from the previous pass in ``in_flight`` (updated in place). A load of
    a unit already in flight is a no-op, as in ``Loader.submit``."""
    ready: set[int] = set()  # waited for, not yet freed
    freed: list[int] = []
    cache_loaded: set[tuple[int, int]] = set()
    computed: list[tuple[int, int]] = []
    for o in ops:
        if o.kind == "load":
            in_flight.add(o.unit)
        elif o.kind == "wait":
            assert o.unit in in_flight, f"waited for unit {o.unit} before loading it"
            assert o.unit not in freed, f"unit {o.unit} waited for again after its free"
            ready.add(o.unit)
        elif o.kind == "load_cache":
            cache_loaded.add((o.unit, o.batch))
        elif o.kind == "compute":
            assert o.unit in ready, f"computed unit {o.unit} outside its wait .. free"
            assert (o.unit, o.batch) in cache_loaded, "computed before its cache was fetched"
            computed.append((o.unit, o.batch))
        elif o.kind == "store_cache":
            assert (o.unit, o.batch) in computed, "stored a cache not yet computed"
        elif o.kind == "free":
            assert o.unit in ready, f"freed unit {o.unit} that was not waited for"
            done = {k for u, k in computed if u == o.unit}
            assert done == set(range(batches)), f"unit {o.unit} freed before all its computes"
            ready.discard(o.unit)
            in_flight.discard(o.unit)
            freed.append(o.unit)
        assert len(in_flight) <= slots, f"{len(in_flight)} units staged, {slots} slots"
    assert sorted(computed) == [(j, k) for j in range(units) for k in range(batches)]
    # zig-zag: every micro-batch of unit j before any of unit j + 1
    assert [u for u, _ in computed] == sorted(u for u, _ in computed)
    assert freed == list(range(units)), "every unit freed once, in order"
    assert not ready


@pytest.mark.parametrize("units", [1, 2, 3, 4, 7, 12])
@pytest.mark.parametrize("batches", [1, 2, 5])
def test_zigzag_at_the_production_lookahead(units, batches):
    """Loads go ``LOOKAHEAD`` units ahead, never more than ``STAGING_SLOTS`` in flight (the
    loader's ring of staging buffers), and wrap to the next pass: pass after pass, each unit
    is loaded before its wait and freed after its last compute."""
    in_flight: set[int] = set()
    for _ in range(3):  # the executor's passes: what one leaves in flight the next one waits for
        ops = list(zigzag(units, batches, LOOKAHEAD))
        check_pass(ops, units, batches, in_flight, STAGING_SLOTS)
        # the next pass's first units are already being read when this one ends (with two
        # units, unit 1's wrapped load comes while this pass still holds it: only unit 0)
        assert in_flight == ({0} if units == 2 else set(range(min(units, LOOKAHEAD + 1))))


def test_zigzag_reads_lookahead_units_ahead_of_the_compute():
    ops = list(zigzag(8, 2, LOOKAHEAD))
    for j in range(8 - LOOKAHEAD):
        first_compute = next(i for i, o in enumerate(ops) if o.kind == "compute" and o.unit == j)
        ahead = j + LOOKAHEAD
        assert next(i for i, o in enumerate(ops) if o.kind == "load" and o.unit == ahead) < (
            first_compute
        ), f"unit {ahead} not in flight while unit {j} computes"


def test_the_executor_runs_the_tested_lookahead(tiny_llama, tmp_path, monkeypatch):
    from layercake.offload import executor

    seen: list[int] = []

    def recording(units: int, batches: int, lookahead: int = 1):
        seen.append(lookahead)
        return zigzag(units, batches, lookahead)

    monkeypatch.setattr(executor, "zigzag", recording)
    llm = layercake.load(tiny_llama, percent=(0, 0, 100, 0, 100, 0), offload_dir=tmp_path)
    llm.generate([[1, 2, 3]], max_new_tokens=2)
    assert seen and set(seen) == {LOOKAHEAD}


# ---- the generator's default lookahead (one unit ahead: double buffering) -----------------
@pytest.mark.parametrize("units,batches", [(1, 1), (2, 3), (5, 1), (7, 4)])
def test_zigzag_computes_each_unit_batch_once_after_its_load(units, batches):
    ops = list(zigzag(units, batches))
    computes = [(o.unit, o.batch) for o in ops if o.kind == "compute"]
    assert sorted(computes) == [(j, k) for j in range(units) for k in range(batches)]
    # zig-zag: every micro-batch of unit j before any of unit j + 1
    assert [u for u, _ in computes] == sorted(u for u, _ in computes)
    in_flight: set[int] = set()
    ready: set[int] = set()
    cache_loaded: set[tuple[int, int]] = set()
    for o in ops:
        if o.kind == "load":
            in_flight.add(o.unit)
        elif o.kind == "wait":
            assert o.unit in in_flight, "waited for a unit never loaded"
            ready.add(o.unit)
        elif o.kind == "load_cache":
            cache_loaded.add((o.unit, o.batch))
        elif o.kind == "compute":
            assert o.unit in ready and (o.unit, o.batch) in cache_loaded
        elif o.kind == "store_cache":
            assert (o.unit, o.batch) in computes
        elif o.kind == "free":
            ready.discard(o.unit)
            in_flight.discard(o.unit)
        # double buffering: never more than two units' weights staged at once
        assert len(in_flight) <= 2
    # the next pass's first units are already in flight when this one ends (prefetch wraps)
    assert 0 in in_flight


def test_zigzag_prefetches_next_unit_before_computing_current():
    ops = list(zigzag(4, 2))
    for j in range(3):
        first_compute = next(i for i, o in enumerate(ops) if o.kind == "compute" and o.unit == j)
        load_next = next(i for i, o in enumerate(ops) if o.kind == "load" and o.unit == j + 1)
        assert load_next < first_compute

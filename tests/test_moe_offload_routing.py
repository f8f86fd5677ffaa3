"""The planner's routing model (layercake/offload/routing.py) against closed forms and sampling."""

import random

import pytest

from layercake.offload import routing as R


def sample_distinct(probs_weights, k, rows, trials, seed=0):
    """Monte Carlo: each row draws k distinct experts with weights (no replacement)."""
    rng = random.Random(seed)
    E = len(probs_weights)
    total = 0
    for _ in range(trials):
        seen = set()
        for _ in range(rows):
            pool, w = list(range(E)), list(probs_weights)
            for _ in range(k):
                e = rng.choices(pool, w)[0]
                i = pool.index(e)
                pool.pop(i), w.pop(i)
                seen.add(e)
        total += len(seen)
    return total / trials


def test_uniform_closed_form_and_limits():
    E, k = 64, 8
    assert R.expected_distinct_uniform(E, k, 1) == pytest.approx(8)
    assert R.expected_distinct(R.uniform_probs(E, k), 1) == pytest.approx(8)
    for B in (1, 8, 64, 256):
        want = E * (1 - (1 - k / E) ** B)
        assert R.expected_distinct(R.uniform_probs(E, k), B) == pytest.approx(want)
    assert R.expected_distinct_uniform(E, k, 64) > 63.9  # nearly every expert at B=64
    assert R.expected_distinct_uniform(E, k, 8) == pytest.approx(42.01, abs=0.01)


def test_uniform_matches_sampling():
    got = sample_distinct([1.0] * 16, 2, 4, 3000)
    assert got == pytest.approx(R.expected_distinct_uniform(16, 2, 4), rel=0.03)


def test_skewed_counts_match_sampling():
    """Marginals measured from sampled counts predict the distinct experts of fresh blocks."""
    rng = random.Random(1)
    weights = [2.0**-i for i in range(8)] + [0.05] * 8
    counts = [0] * 16
    for _ in range(4000):  # observe routing: count each row's selections
        pool, w = list(range(16)), list(weights)
        for _ in range(2):
            e = rng.choices(pool, w)[0]
            i = pool.index(e)
            pool.pop(i), w.pop(i)
            counts[e] += 1
    p = R.probs_from_counts(counts, 2)
    assert sum(p) == pytest.approx(2)
    for B in (1, 4, 16):
        want = sample_distinct(weights, 2, B, 1500, seed=B)
        assert R.expected_distinct(p, B) == pytest.approx(want, rel=0.05)
    # skew needs fewer distinct experts than uniform routing at the same block
    assert R.expected_distinct(p, 4) < R.expected_distinct_uniform(16, 2, 4) - 1


def test_hit_rate_and_cold_reads():
    p = R.probs_from_counts([40, 20, 10, 10, 5, 5, 5, 5], 2)
    assert R.hottest(p, 2) == [0, 1]
    assert R.hit_rate(p, 0) == 0
    assert R.hit_rate(p, 2) == pytest.approx(0.6)
    assert R.hit_rate(p, 8) == pytest.approx(1)
    # holding experts removes exactly their expected reads
    B = 3
    all_cold = R.expected_cold_reads(p, B, 0)
    assert all_cold == pytest.approx(R.expected_distinct(p, B))
    held = 1 - (1 - p[0]) ** B + 1 - (1 - p[1]) ** B
    assert R.expected_cold_reads(p, B, 2) == pytest.approx(all_cold - held)
    assert R.expected_cold_reads(p, B, 8) == 0


def test_predict_bytes_time_and_memory():
    shape = R.MoeShape(
        layers=4,
        num_experts=64,
        top_k=8,
        expert_bytes=12_582_912,
        expert_params=6_291_456,
        dense_params=17_000_000,
    )
    u = R.uniform_probs(64, 8)
    one = R.predict(shape, 1, u, resident=0, disk_gbps=1.0, gflops=100.0)
    assert one.bytes_per_step == pytest.approx(4 * 8 * shape.expert_bytes)  # k per layer
    assert one.step_s == pytest.approx(max(one.disk_s, one.compute_s))
    big = R.predict(shape, 256, u, resident=16, disk_gbps=1.0, gflops=100.0)
    assert big.cold_reads_per_layer == pytest.approx(48, abs=0.01)  # every cold expert once
    assert big.resident_bytes == 4 * 16 * shape.expert_bytes
    assert big.hit_rate == pytest.approx(0.25)
    assert big.tok_s > one.tok_s * 20  # one read serves the block
    assert R.resident_experts(shape, 4 * 10 * shape.expert_bytes + 5) == 10
    assert R.resident_experts(shape, 10**15) == 64
    assert R.throughput(1.0, 0.5, 8, 3) == pytest.approx(8 * 3 / 2.0)
    with pytest.raises(ValueError):
        R.predict(shape, 0, u, 0, 1.0, 1.0)
    with pytest.raises(ValueError):
        R.uniform_probs(4, 5)


def test_planner_reads_only_the_routed_cold_experts():
    """The cost model's bytes per step for a MoE: the always-run units' disk share plus, per
    layer, the expected chosen experts not held (``routing``), not every expert."""
    from types import SimpleNamespace

    from test_moe_offload import moe_units

    from layercake.offload.calibrate import UnitTimes
    from layercake.offload.measure import Machine
    from layercake.offload.planner import step_seconds
    from layercake.offload.policy import Policy

    units = moe_units(8)
    t = {1: 0.0, 64: 0.0}
    m = SimpleNamespace(units=units, config=SimpleNamespace(num_experts_per_tok=2),
                        times=UnitTimes(0.0, 0.0, t, t, t), kv_itemsize=2)  # fmt: skip
    machine = Machine("x", disk_gbps=1.0, matmul_gflops=1.0)

    def read(bs, w_cpu=0.0):
        p = Policy(0, w_cpu, 100, 0, 100, 0, batch_size=bs, num_batches=1)
        return step_seconds(m, p, machine, 1, False, 0, 8)[1]

    # one row: 2 of 8 experts per layer, besides the layers and head (all on disk)
    assert read(1) == 2 * (100 + 2 * 50) + 100
    many = R.expected_cold_reads(R.uniform_probs(8, 2), 64, 0)
    assert read(64) == pytest.approx(2 * (100 + many * 50) + 100, abs=2)
    # with the always-run units and 4 experts per layer in RAM: only cold experts are read
    held = 100 * (2 * 100 + 100 + 2 * 4 * 50) / 1100
    assert read(64, held) == pytest.approx(2 * R.expected_cold_reads(R.uniform_probs(8, 2), 64, 4)
                                           * 50, abs=2)  # fmt: skip


def test_expert_budget_keeps_no_staging_for_layers_that_fit():
    """When the units that always run fit the budget, only routed experts stream (through their
    own ring, in ``work``): the layers' staging ring is neither reserved nor counted, and the
    planned bytes fill the budget; where they do not fit (or without routed experts) it is."""
    from layercake.offload.footprint import Footprint, memory_bytes
    from layercake.offload.policy import plan_policy

    fp = Footprint(weights=5_000_000_000, compute_ratio=2.0, max_unit=40_000_000,
                   activations=200_000_000, kv=100_000_000, expert_staging=100_000_000,
                   always=400_000_000, headroom=50_000_000)  # fmt: skip
    budget = 2_000_000_000
    p = plan_policy(fp, budget, None, False, 64, 1)
    mem = memory_bytes(fp, p, False, 0, 0)
    assert mem["staging"] == 0 and mem["page_cache_headroom"] == fp.headroom
    assert budget - 1000 <= sum(mem.values()) <= budget
    for other in ({"always": fp.weights}, {"expert_staging": 0, "always": 0}):
        staged = Footprint(**{**fp.__dict__, **other})
        q = plan_policy(staged, budget, None, False, 64, 1)
        assert memory_bytes(staged, q, False, 0, 0)["staging"] > 0
    assert plan_policy(Footprint(**{**fp.__dict__, "always": fp.weights}), budget, None, False,
                       64, 1).w_cpu < p.w_cpu  # fmt: skip
    tight = plan_policy(fp, 600_000_000, None, False, 64, 1)  # the layers do not fit: staged
    assert memory_bytes(fp, tight, False, 0, 0)["staging"] > 0

"""The placement policy (``layercake/offload/policy.py``): sizes, FlexGen's percentages, and the
placement planned for a byte budget."""

from __future__ import annotations

import pytest

from layercake.errors import LayercakeError
from layercake.offload.footprint import Footprint
from layercake.offload.policy import STAGING_SLOTS, Policy, parse_bytes, plan_policy


def test_parse_bytes():
    assert parse_bytes("1.6GB") == 1_600_000_000
    assert parse_bytes("800MiB") == 800 * 2**20
    assert parse_bytes("2G") == 2 * 10**9
    assert parse_bytes(1234) == 1234
    with pytest.raises(LayercakeError, match="size"):
        parse_bytes("lots")


@pytest.mark.parametrize(
    "pct", [(101, 0, 100, 0, 100, 0), (60, 50, 100, 0, 100, 0), (-1, 0, 0, 0, 0, 0)]
)
def test_percentages_out_of_range(pct):
    with pytest.raises(LayercakeError, match="0-100"):
        Policy.from_percent(pct)
    with pytest.raises(LayercakeError, match="six numbers"):
        Policy.from_percent(pct[:4])


def _fp(**kw):
    d = dict(weights=2_000_000_000, compute_ratio=2.0, max_unit=100_000_000,
             activations=100_000_000, kv=100_000_000)  # fmt: skip
    d.update(kw)
    return Footprint(**d)


def test_plan_respects_budget_and_is_monotonic():
    last = -1.0
    for budget in (700e6, 900e6, 1.2e9, 1.8e9, 2.5e9):
        p = plan_policy(_fp(), int(budget), None, False, 32, 1)
        resident = 2e9 * (p.w_device * 2 + p.w_cpu) / 100
        staging = STAGING_SLOTS * 100e6 * p.w_disk / 100
        kv = 100e6 * (p.cache_device + p.cache_cpu) / 100
        assert resident + staging + kv + 100e6 + 200e6 <= budget + 1
        held = p.w_device + p.w_cpu
        assert held >= last
        last = held
    assert plan_policy(_fp(), int(5e9), None, False, 32, 1).w_device == 100


def test_plan_budget_too_small_says_minimum():
    least = (300e6 + STAGING_SLOTS * 100e6) / 1e9  # activations + scratch, and the slots
    with pytest.raises(LayercakeError, match=rf"at least {least:.2f} GB"):
        plan_policy(_fp(), int(400e6), None, False, 32, 1)

"""benchmarks/offload.py's ``spawn``: each timed worker in a session of its own, its autogroup
raised, so that other sessions' niced work does not take half the cores from it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

AUTOGROUP = Path("/proc/self/autogroup")
PRINT = "import json, os; print(json.dumps({'autogroup': open('/proc/self/autogroup').read(), " \
    "'session': os.getsid(0)}))"  # fmt: skip


@pytest.mark.skipif(not AUTOGROUP.exists() or os.geteuid() != 0,
                    reason="needs Linux autogroups and root to raise one")  # fmt: skip
def test_a_spawned_worker_runs_in_its_own_raised_autogroup():
    from benchmarks.offload import spawn

    ours = AUTOGROUP.read_text()
    r = spawn([sys.executable, "-c", PRINT], None, 60)
    assert r["autogroup"].strip().endswith("nice -20"), r
    assert r["session"] != os.getsid(0)
    assert AUTOGROUP.read_text() == ours  # this session's untouched


def test_a_spawned_worker_runs_where_autogroups_cannot_be_raised(monkeypatch):
    """Without the right to raise it (or without autogroups) the command runs all the same."""
    from benchmarks import offload

    monkeypatch.setattr(offload, "RAISE_AUTOGROUP", offload.RAISE_AUTOGROUP.replace(
        "/proc/self/autogroup", "/nonexistent/autogroup"))  # fmt: skip
    r = offload.spawn([sys.executable, "-c", "print('{\"ok\": 1}')"], None, 60)
    assert r["ok"] == 1

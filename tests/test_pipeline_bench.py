"""benchmarks/pipeline.py's own arithmetic (its runs need hostsim hosts and minutes)."""


def test_breakdown_cuts_the_running_totals_at_the_timed_passes():
    """The benchmark's per-host breakdown: the prefill's passes and the decode steps' from the
    marks, a pass after the timed ones (the logits check) left out, the parts summing to the
    wall."""
    from benchmarks.pipeline import LINK, breakdown

    r = dict(forwards=3, decode_steps=2, prefill_s=2.0, decode_s=1.0)
    marks = [[1.5, 0.5, 0.2, 0.01, LINK / 10, 10, 5e8, 1.0], [1.8, 0.6, 0.5, 0.02, LINK / 5, 20,
             6e8, 1.2], [2.1, 0.7, 0.6, 0.03, LINK / 5, 30, 7e8, 1.4], [9.0] * 8]  # fmt: skip
    b = breakdown(r, dict(marks=marks))
    pre, dec = b["prefill_s"], b["decode_ms_per_step"]
    assert pre == dict(compute=1.0, weights_wait=0.5, network=0.1, send=0.01, idle=0.39,
                       disk_read=1.0, disk_mb=500.0)  # fmt: skip
    assert dec["compute"] == 200.0 and dec["weights_wait"] == 100.0 and dec["disk_mb"] == 100.0
    assert abs(sum(dec[k] for k in ("compute", "weights_wait", "network", "send", "idle"))
               - 500.0) < 1e-6  # fmt: skip
    assert breakdown(dict(r, forwards=5), dict(marks=marks[:3])) == {}


def test_budgets_are_the_hosts_caps():
    """hostsim reads 1414M as MiB; the budgets the processes plan with are the same bytes."""
    from benchmarks.pipeline import binary
    from layercake.offload.policy import parse_bytes

    assert parse_bytes(binary("1414M")) == 1414 * 2**20 and binary("2GiB") == "2GiB"
    assert binary("1.5G") == "1.5GiB" and binary("3000000") == "3000000"

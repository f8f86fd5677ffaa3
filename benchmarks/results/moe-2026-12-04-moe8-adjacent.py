"""A case's JSON line (stdin: moe.py's output) with what moe8's hold measured around it
(moe-2026-12-04-moe8-hold.sh): the best-reader probes right before and after (env P0, P1 in GB/s,
their records in PROBES), /proc/diskstats (D0, D1: sectors read, ms reading, io ms, reads
completed), /proc/stat (C0, C1) and loadavg (L0).

Bounds (each the benchmark's ``moe.bound`` at another disk rate): ``bound_s_adjacent`` at the
faster adjacent probe (moe6's), and ``bound_s_honest`` at the fastest of the adjacent probes and
the run's own loader (``loader_gbps``): a bound whose disk is slower than what the run got is
not a bound, so the honest fraction never credits the engine with a slow probe."""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # moe.py
import moe  # noqa: E402  (no torch)

env = os.environ
machine = None
probes = [json.load(open(p)) for p in env.get("PROBES", "").split()]
for line in sys.stdin:
    r = json.loads(line)
    if r.get("bench") == "moe-machine":
        machine = r
        continue
    if r.get("bench") != "moe":
        continue
    p0, p1 = float(env["P0"]), float(env["P1"])
    d0, d1 = ([int(x) for x in env[k].split()] for k in ("D0", "D1"))
    r.update(which=env["WHICH"], hold=env["TAG"], start_utc=env["T0"], loadavg_before=env["L0"],
             probe_before_gbps=p0, probe_after_gbps=p1, probe_adjacent_gbps=max(p0, p1),
             probes_adjacent=probes,
             diskstats_gb_read=round((d1[0] - d0[0]) * 512 / 1e9, 2))  # fmt: skip
    if len(d0) > 3 and d1[3] > d0[3]:  # the mean read request over the case (all readers)
        r["diskstats_request_kib"] = round((d1[0] - d0[0]) * 512 / (d1[3] - d0[3]) / 1024)
    if env.get("C0"):  # CPU seconds over the case (USER_HZ 100): niced = the other helpers'
        c0, c1 = ([int(x) for x in env[k].split()] for k in ("C0", "C1"))
        names = ("user", "nice", "system", "idle", "iowait", "steal")
        r["cpu_s"] = {n: round((b - a) / 100, 1) for n, a, b in zip(names, c0, c1)}
    if "process_gb_read" in r:  # the probes are outside D0..D1; the case's own reads inside
        r["others_gb_read"] = round(r["diskstats_gb_read"] - r["process_gb_read"], 2)
    plan = r.get("memory_plan") or {}
    if plan.get("weights") and machine is not None:  # whole experts held per layer, as planned
        m = machine["model"]
        held = (plan["weights"] - m["non_expert_bytes"]) / m["expert_bytes"] / m["layers"]
        r["experts_held_per_layer"] = round(held, 2)
        r["plan_non_weight_mb"] = round((sum(plan.values()) - plan["weights"]) / 1e6)
    if "throughput_tok_s" in r and machine is not None:
        a = argparse.Namespace(layers=6, prompt_len=r["prompt_len"], gen_len=r["gen_len"])
        key = f"ref-6l-1-b{r['batch']}-p{r['prompt_len']}-g{r['gen_len']}.json"
        ref = json.load(open(os.path.join(env["REF"], key)))
        needs = moe.engine_needs(a, r["batch"], machine)
        total = r["prefill_s"] + r["decode_s"]
        for name, rate in (("adjacent", max(p0, p1)),
                           ("honest", max(p0, p1, r.get("loader_gbps") or 0.0))):  # fmt: skip
            b = moe.bound(a, r["batch"], ref, {**machine, "disk_gbps": rate}, r["cap"], needs)
            r[f"bound_s_{name}"] = b["bound_s"]
            r[f"bound_disk_gbps_{name}"] = rate
            r[f"fraction_of_bound_{name}"] = round(b["bound_s"] / total, 3)
        if r["fraction_of_bound_adjacent"] > 1:
            r["probe_problem_adjacent"] = "faster than the bound: the adjacent probes too slow"
        r["loader_over_probe"] = round((r.get("loader_gbps") or 0) / max(p0, p1), 3)
    print(json.dumps(r))

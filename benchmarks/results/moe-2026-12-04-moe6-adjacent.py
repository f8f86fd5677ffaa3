"""A case's JSON line (stdin: moe.py's output) with the bound recomputed from the disk probes
taken right before and after it (env P0, P1 in GB/s; the faster: the shorter, stricter bound),
/proc/diskstats before and after (D0, D1: sectors read, ms reading, io ms) and what the rest of
the machine read meanwhile (diskstats less the worker's reads after its imports: its imports'
reads after the cache drop are in it too) and the CPU time by kind over the case (C0, C1:
/proc/stat's user, nice, system, idle, iowait, steal)."""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # moe.py
import moe  # noqa: E402  (no torch)

env = os.environ
machine = None
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
             diskstats_gb_read=round((d1[0] - d0[0]) * 512 / 1e9, 2))  # fmt: skip
    if env.get("C0"):  # CPU seconds over the case (USER_HZ 100): niced = the other helpers'
        c0, c1 = ([int(x) for x in env[k].split()] for k in ("C0", "C1"))
        names = ("user", "nice", "system", "idle", "iowait", "steal")
        r["cpu_s"] = {n: round((b - a) / 100, 1) for n, a, b in zip(names, c0, c1)}
    if "process_gb_read" in r:  # the probes are outside D0..D1; the case's own reads inside
        r["others_gb_read"] = round(r["diskstats_gb_read"] - r["process_gb_read"], 2)
    if "throughput_tok_s" in r and machine is not None:
        a = argparse.Namespace(layers=6, prompt_len=r["prompt_len"], gen_len=r["gen_len"])
        key = f"ref-6l-1-b{r['batch']}-p{r['prompt_len']}-g{r['gen_len']}.json"
        ref = json.load(open(os.path.join(env["REF"], key)))
        adj = {**machine, "disk_gbps": max(p0, p1)}
        b = moe.bound(a, r["batch"], ref, adj, r["cap"], moe.engine_needs(a, r["batch"], machine))
        total = r["prefill_s"] + r["decode_s"]
        r["bound_s_adjacent"] = b["bound_s"]
        r["fraction_of_bound_adjacent"] = round(b["bound_s"] / total, 3)
        if r["fraction_of_bound_adjacent"] > 1:
            r["probe_problem_adjacent"] = "faster than the bound: the adjacent probes too slow"
    print(json.dumps(r))

"""Medians (min-max) of the moe6 holds' B=64 cases, old and new: python3 this.py HOLD..."""

import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def fields(r: dict) -> dict:
    t, x = r["times"], r["expert_stats"]
    out = dict(
        tok_s=r["throughput_tok_s"], prefill_s=r["prefill_s"], decode_s=r["decode_s"],
        compute_s=t["forward_s"] - t["weights_wait_s"], wait_s=t["weights_wait_s"],
        loader_gbps=r.get("loader_gbps"), probe_adjacent=r.get("probe_adjacent_gbps"),
        gb_per_token=r.get("gen_gb_read_per_token"), read_per_layer=x["experts_read_per_layer"],
        bound_s=r["bound_s"], frac=r["fraction_of_bound"],
        bound_adj_s=r.get("bound_s_adjacent"), frac_adj=r.get("fraction_of_bound_adjacent"),
        peak_rss_mb=r.get("peak_rss_mb"), load1=float(r["loadavg_before"].split()[0]),
    )  # fmt: skip
    if "cpu_s" in r:
        out.update(niced_cpu_s=r["cpu_s"]["nice"], steal_s=r["cpu_s"]["steal"])
    p = r.get("passes")
    if p:
        out["prompt_pass_s"], out["prompt_wait_s"] = p[0][1], p[0][2]
        out["step_s"] = statistics.median(q[1] for q in p[1:])
        out["step_wait_s"] = statistics.median(q[2] for q in p[1:])
    return out


rows: dict[str, list[dict]] = {}
for hold in sys.argv[1:]:
    for line in open(HERE / f"moe-2026-12-04-moe6{hold}.jsonl"):
        r = json.loads(line)
        if "throughput_tok_s" not in r:
            print("no result:", hold, r.get("which"), r.get("error"))
            continue
        ok = r.get("same_greedy_tokens_as_layercake_in_ram") and r.get("logits_max_abs_diff") == 0
        rows.setdefault(r["which"], []).append({**fields(r), "equal": ok})
for which, rs in rows.items():
    print(f"{which}: {len(rs)} runs, equal to the in-RAM run: {sum(r['equal'] for r in rs)}")
    for k in rs[0]:
        v = [r[k] for r in rs if r.get(k) is not None and k != "equal"]
        if v:
            print(f"  {k:16s} {statistics.median(v):8.3f} ({min(v):.3f}-{max(v):.3f})")

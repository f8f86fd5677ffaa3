"""Medians (min-max) of moe8's holds: python3 this.py HOLD...  (lines moe-2026-12-04-moe8HOLD.jsonl;
NAME=moe9: moe9's holds, its old being main at dbe5abb with the same plan as new)

Per engine (old: main at fe18076, its plan's pass the whole context; new: this branch, the job's
prompt as pass_tokens) and batch: tok/s, the prompt's pass and decode, the run's loader rate and
the adjacent best-reader probes (and which reader won), fractions of the bound at the hold's
probe, at the faster adjacent probe and the honest one (at max(adjacent probes, the run's
loader)), experts held and read per layer, GB read per token, peak RSS and the cgroup's peak
(page cache counted), and the equality with the in-RAM run. "quiet": runs during which the
other helpers' niced work took under QUIET_NICE_S CPU seconds. Then new against old pair by
pair (the k-th run of each in a hold)."""

import json
import os
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
QUIET_NICE_S = 5.0
NAME = os.environ.get("NAME", "moe8")


def med(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    m = statistics.median(xs)
    return f"{m:.3g} ({min(xs):.3g}-{max(xs):.3g})" if len(xs) > 1 else f"{m:.3g}"


rows: dict[tuple, list[dict]] = {}
seq = []
for hold in sys.argv[1:]:
    for line in open(HERE / f"moe-2026-12-04-{NAME}{hold}.jsonl"):
        r = json.loads(line)
        if "throughput_tok_s" not in r:
            print("no result:", hold, r.get("which"), r.get("batch"), str(r.get("error"))[:200])
            continue
        xs = r.get("expert_stats") or {}
        won = [max(("files", "loader"), key=lambda k: p[f"{k}_gbps"]) for p in r["probes_adjacent"]]
        f = dict(tok_s=r["throughput_tok_s"], prefill_s=r["prefill_s"], decode_s=r["decode_s"],
                 loader=r.get("loader_gbps"), probe=r["probe_adjacent_gbps"],
                 loader_over_probe=r.get("loader_over_probe"), frac=r.get("fraction_of_bound"),
                 frac_adj=r.get("fraction_of_bound_adjacent"),
                 frac_honest=r.get("fraction_of_bound_honest"),
                 held=r.get("experts_held_per_layer"), read=xs.get("experts_read_per_layer"),
                 gb_tok=r.get("gen_gb_read_per_token"), rss=r.get("peak_rss_mb"),
                 cg=r.get("peak_mb"), nice=(r.get("cpu_s") or {}).get("nice", 0.0),
                 equal=bool(r.get("same_greedy_tokens_as_layercake_in_ram"))
                 and r.get("logits_max_abs_diff") == 0.0, won=won)  # fmt: skip
        rows.setdefault((r["which"], r["batch"], "all"), []).append(f)
        if f["nice"] < QUIET_NICE_S:
            rows.setdefault((r["which"], r["batch"], "quiet"), []).append(f)
        seq.append((hold, r["which"], r["batch"], f))

keys = ("tok_s", "prefill_s", "decode_s", "loader", "probe", "loader_over_probe", "frac",
        "frac_adj", "frac_honest", "held", "read", "gb_tok", "rss", "cg")  # fmt: skip
for (which, batch, kind), fs in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][2])):
    equal = sum(f["equal"] for f in fs)
    won = [w for f in fs for w in f["won"]]
    print(f"{which} B={batch} {kind}: {len(fs)} runs, equal to in-RAM {equal}/{len(fs)}, "
          f"probe won by loader {won.count('loader')}/{len(won)}")  # fmt: skip
    for k in keys:
        print(f"    {k:18s} {med([f[k] for f in fs])}")

for batch in sorted({b for _, _, b, _ in seq}):
    pairs = []
    for h in sys.argv[1:]:
        old = [f for hold, w, b, f in seq if hold == h and w == "old" and b == batch]
        new = [f for hold, w, b, f in seq if hold == h and w == "new" and b == batch]
        pairs += list(zip(old, new))
    for k in ("tok_s", "prefill_s", "decode_s", "frac_honest", "read"):
        d = [(o[k], n[k]) for o, n in pairs if o[k] is not None and n[k] is not None]
        if d:
            print(
                f"B={batch} new vs old {k:12s} new higher in {sum(n > o for o, n in d)} of "
                f"{len(d)}; median new/old {statistics.median(n / o for o, n in d if o):.3f}"
            )

"""Medians (min-max) of the moe7 holds' B=64 cases, old (14dd4b6), new and diet: python3 this.py
HOLD... (moe6's summary, ``moe-2026-12-04-moe6-summary.py``, on moe7's files; also the quiet
runs alone: those during which the other helpers' niced work took under QUIET_NICE_S CPU
seconds, and each arm against old, run by run).

A hold whose probe ran its matmuls beside the other helpers' work (under MIN_PROBE_GFLOPS at 64
rows: holds b, d, f at 113-279 against 523-616) has a compute bound several times too long: its
runs count for tok/s and pairs, not for any fraction."""

import importlib.util
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("moe6sum", HERE / "moe-2026-12-04-moe6-summary.py")
base = importlib.util.module_from_spec(spec)
spec.loader.exec_module(base)
base.REF = Path("/tmp/moe7-ref-amx")
QUIET_NICE_S = 5.0
MIN_PROBE_GFLOPS = 400.0
FRACTIONS = ("bound_s", "frac", "bound_adj_s", "frac_adj", "frac_loader")

rows: dict[str, list[dict]] = {}
seq: list[tuple[str, str, dict]] = []
for hold in sys.argv[1:]:
    base.MACHINE.update(json.loads((HERE / f"moe-2026-12-04-moe7{hold}-probe.json").read_text()))
    contended = base.MACHINE["matmul_gflops"]["64"] < MIN_PROBE_GFLOPS
    for line in open(HERE / f"moe-2026-12-04-moe7{hold}.jsonl"):
        r = json.loads(line)
        if "throughput_tok_s" not in r:
            print("no result:", hold, r.get("which"), r.get("error"))
            continue
        ok = r.get("same_greedy_tokens_as_layercake_in_ram") and r.get("logits_max_abs_diff") == 0
        f = {**base.fields(r), "equal": ok}
        if contended:
            f.update(dict.fromkeys(FRACTIONS))
        rows.setdefault(r["which"], []).append(f)
        seq.append((hold, r["which"], f))
        if f.get("niced_cpu_s", 0) < QUIET_NICE_S:
            quiet = f"{r['which']} (quiet: others' niced CPU < {QUIET_NICE_S:g} s)"
            rows.setdefault(quiet, []).append(f)
base.print_medians(rows)

# each arm against old within a hold, the k-th run of one with the k-th of the other (the
# holds run ABBA or ABCCBA: each pair is as close in time as the order allows)
for arm in ("new", "diet"):
    pairs = []
    for h in sys.argv[1:]:
        old = [f for hold, label, f in seq if hold == h and label == "old"]
        mine = [f for hold, label, f in seq if hold == h and label == arm]
        pairs += list(zip(old, mine))
    for k in ("tok_s", "prompt_pass_s", "prompt_wait_s", "step_s", "frac", "frac_adj",
              "frac_loader"):  # fmt: skip
        d = [(o[k], n[k]) for o, n in pairs if o.get(k) is not None and n.get(k) is not None]
        if d:
            print(
                f"{arm} vs old {k:14s} {arm} higher in {sum(n > o for o, n in d)} of {len(d)};"
                f" median {arm}/old {statistics.median(n / o for o, n in d if o):.3f}"
            )

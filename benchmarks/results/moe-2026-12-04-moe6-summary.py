"""Medians (min-max) of the moe6 holds' B=64 cases, old and new: python3 this.py HOLD...

Beside the fractions of the bound (the hold's probe; the adjacent probes), ``frac_loader`` is a
diagnostic, not the figure: the bound at the rate the engine's own loader got in that run
(its bytes / its read time), i.e. what the engine loses besides the disk's rate."""

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import moe  # noqa: E402  (no torch)

REF = Path("/tmp/moe6-ref-amx")  # the uncapped references (moe7 sets its own)
# what each hold's "new" ran: the final engine (02ccba8: the first layer read ahead) is hold
# c's "noextra" and holds d, f, g and h's "new"; holds a and c's "new" held extra experts at decode
LABEL = {("a", "new"): "new with 6 decode extras (dropped)",
         ("c", "new"): "new with 11 decode extras (dropped)",
         ("c", "noextra"): "new", ("d", "new"): "new", ("f", "new"): "new",
         ("g", "new"): "new", ("g", "noahead"): "new without the first read-ahead",
         ("h", "new"): "new", ("h", "noahead"): "new without the first read-ahead"}  # fmt: skip
MACHINE: dict = {}


def frac_loader(r: dict) -> float | None:
    """The bound at the loader's own rate in the run, over the run's time."""
    if not r.get("loader_gbps") or not MACHINE:
        return None
    a = argparse.Namespace(layers=6, prompt_len=r["prompt_len"], gen_len=r["gen_len"])
    ref = json.loads((REF / f"ref-6l-1-b{r['batch']}-p16-g8.json").read_text())
    m = {**MACHINE, "disk_gbps": r["loader_gbps"]}
    b = moe.bound(a, r["batch"], ref, m, r["cap"], moe.engine_needs(a, r["batch"], m))
    return round(b["bound_s"] / (r["prefill_s"] + r["decode_s"]), 3)


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
    out["frac_loader"] = frac_loader(r)
    if "cpu_s" in r:
        out.update(niced_cpu_s=r["cpu_s"]["nice"], steal_s=r["cpu_s"]["steal"])
    p = r.get("passes")
    if p:
        out["prompt_pass_s"], out["prompt_wait_s"] = p[0][1], p[0][2]
        out["step_s"] = statistics.median(q[1] for q in p[1:])
        out["step_wait_s"] = statistics.median(q[2] for q in p[1:])
    return out


def main() -> None:
    rows: dict[str, list[dict]] = {}
    for hold in sys.argv[1:]:
        MACHINE.update(json.loads((HERE / f"moe-2026-12-04-moe6{hold}-probe.json").read_text()))
        for line in open(HERE / f"moe-2026-12-04-moe6{hold}.jsonl"):
            r = json.loads(line)
            if "throughput_tok_s" not in r:
                print("no result:", hold, r.get("which"), r.get("error"))
                continue
            same = r.get("same_greedy_tokens_as_layercake_in_ram")
            ok = same and r.get("logits_max_abs_diff") == 0
            label = LABEL.get((hold, r["which"]), r["which"])
            rows.setdefault(label, []).append({**fields(r), "equal": ok})
    print_medians(rows)


def print_medians(rows: dict[str, list[dict]]) -> None:
    for which, rs in rows.items():
        print(f"{which}: {len(rs)} runs, equal to the in-RAM run: {sum(r['equal'] for r in rs)}")
        for k in rs[0]:
            v = [r[k] for r in rs if r.get(k) is not None and k != "equal"]
            if v:
                print(f"  {k:16s} {statistics.median(v):8.3f} ({min(v):.3f}-{max(v):.3f})")


if __name__ == "__main__":
    main()

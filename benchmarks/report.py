"""The benchmark report: markdown tables and PNG plots from the benchmarks' JSON lines.

Reads the JSON lines of ``offload.py`` (layercake vs transformers + Accelerate under memory caps,
fraction of the machine's bound) and ``planner.py`` (planned vs hand-picked policies, predicted vs
measured) from ``benchmarks/results/*.jsonl``, or first runs them (``--run``, each under the
benchmark lock, appending to ``results/<bench>-<date>.jsonl``), and writes ``report/README.md``
with ``throughput_vs_batch.png``, ``engines.png`` and ``bound.png`` next to it. The plots need
matplotlib (the ``bench`` extra); without it only the markdown is written.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
LOCK = "/tmp/layercake-bench.lock"


def run(bench: str, args: list[str], results: Path) -> Path:
    """Run ``benchmarks/<bench>.py`` under the lock; its JSON lines go to a dated results file."""
    out = results / f"{bench}-{time.strftime('%Y-%m-%d')}.jsonl"
    cmd = ["flock", LOCK, sys.executable, str(HERE / f"{bench}.py"), *args]
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    with open(out, "a") as f:
        f.writelines(ln + "\n" for ln in lines)
    if p.returncode:
        print(f"{bench}.py exited {p.returncode}: {p.stderr.strip()[-500:]}", file=sys.stderr)
    return out


def read(files: list[Path]) -> list[dict]:
    rows = []
    for f in files:
        for line in f.read_text().splitlines():
            if line.strip().startswith("{"):
                rec = json.loads(line)
                rec["_file"] = f.name
                rows.append(rec)
    return rows


def table(head: list[str], rows: list[list]) -> str:
    fmt = lambda v: "" if v is None else f"{v:g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def planner_section(rows: list[dict]) -> list[str]:
    cases = [r for r in rows if r.get("bench") == "planner" and "measured_tok_s" in r]
    summary = [r for r in rows if r.get("bench") == "planner-summary"]
    machine = [r for r in rows if r.get("bench") == "planner-machine"]
    if not cases:
        return []
    out = ["## Planner: planned policy vs hand-picked ones (same run)", ""]
    if machine:
        m = machine[-1]
        out.append(f"Machine: disk {m['disk_gbps']} GB/s (direct reads), fp32 matmul "
                   f"{m['matmul_gflops']} GFLOP/s; plan: `{m['plan']['flags']}`.")  # fmt: skip
        out.append("")
    head = ["case", "policy", "block", "measured tok/s", "predicted tok/s", "error",
            "prefill s (pred)", "decode s/step (pred)", "peak RSS MiB (cap)",
            "planned MiB"]  # fmt: skip
    body = [
        [r["case"], r["policy"], r["block"], r["measured_tok_s"], r["predicted_tok_s"],
         f"{100 * r['prediction_error']:+.1f} %",
         f"{r['prefill_s']} ({r['predicted_prefill_s']:.2f})",
         f"{r['decode_step_s']} ({r['predicted_decode_step_s']:.3f})",
         f"{r['peak_rss_mb']} ({r['cap']})", r["predicted_memory_mb"]]
        for r in cases
    ]  # fmt: skip
    out += [table(head, body), ""]
    for s in summary[-1:]:
        out.append(
            f"**Planned {s['planned_tok_s']} tok/s = {100 * s['planned_over_best']:.0f} % of the "
            f"best hand-picked ({s['best_hand_picked']}, {s['best_tok_s']} tok/s); the planned "
            f"prediction is off by {100 * s['planned_prediction_error']:+.1f} %, the worst of all "
            f"cases by {100 * s['max_abs_prediction_error']:.1f} %.**"
        )
        out.append("")
    return out


def offload_section(rows: list[dict]) -> list[str]:
    runs = [r for r in rows if r.get("bench") == "offload" and "throughput_tok_s" in r]
    if not runs:
        return []
    out = ["## Offloading under a memory cap: layercake vs transformers + Accelerate", ""]
    head = ["engine", "cap", "batch", "policy", "tok/s", "prefill tok/s", "decode tok/s",
            "peak RSS MB", "fraction of bound", "results file"]  # fmt: skip
    body = [[r["engine"], r["cap"], r["batch"], r.get("policy"), r["throughput_tok_s"],
             r["prefill_tok_s"], r["decode_tok_s"], r.get("peak_rss_mb"),
             r.get("fraction_of_bound"), r["_file"]] for r in runs]  # fmt: skip
    out += [table(head, body), ""]
    failed = [r for r in rows if r.get("bench") == "offload" and "error" in r]
    for r in failed:
        out.append(f"- {r['engine']} at cap {r['cap']}, batch {r['batch']}: {r['error']} "
                   f"after {r.get('wall_s')} s")  # fmt: skip
    ratios = [r for r in rows if r.get("bench") == "offload-ratio"]
    for r in ratios:
        v = r.get("layercake_over_accelerate", r.get("layercake_over_accelerate_best_range"))
        v = r.get("accelerate") if v is None else v
        out.append(f"- cap {r['cap']}, batch {r['batch']}: layercake / Accelerate = {v}")
    return out + [""]


def plots(rows: list[dict], folder: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing (pip install 'layercake[bench]'): no plots", file=sys.stderr)
        return []
    made = []
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in rows:
        if r.get("bench") == "planner" and "measured_tok_s" in r:
            kind = ("planned" if r["case"] == "planned" else "all weights on disk"
                    if "all-disk" in r["case"] else "int4 weights" if r["int4"]
                    else "budget placement")  # fmt: skip
            nb = r["policy"].rsplit(" x ", 1)[-1].rstrip(")") if " x " in r["policy"] else "1"
            series[f"{kind}, {nb} micro-batch(es) ({r['cap']})"].append(
                (r["block"], r["measured_tok_s"])
            )
        elif r.get("bench") == "offload" and r.get("engine") == "layercake" and r.get("cap"):
            if "throughput_tok_s" in r:
                series[f"offload.py budget ({r['cap']})"].append(
                    (r["batch"], r["throughput_tok_s"])
                )
    if series:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, pts in sorted(series.items()):
            pts.sort()
            style = "*" if name.startswith("planned") else "o-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name, markersize=9)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("effective batch (micro-batch x micro-batches)")
        ax.set_ylabel("throughput, generated tok/s")
        ax.set_title("1B-shaped model under a memory cap")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(folder / "throughput_vs_batch.png", dpi=110)
        made.append("throughput_vs_batch.png")
    engines: dict[str, dict[str, float]] = defaultdict(dict)
    for r in rows:
        if r.get("bench") == "offload" and r.get("cap") and r.get("batch") == 32:
            engines[r["cap"]][r["engine"]] = r.get("throughput_tok_s", 0.0)
    if engines:
        fig, ax = plt.subplots(figsize=(6, 4))
        caps = sorted(engines)
        for k, eng in enumerate(("layercake", "accelerate")):
            vals = [engines[c].get(eng, 0.0) for c in caps]
            ax.bar([i + 0.38 * k for i in range(len(caps))], vals, 0.38, label=eng)
        ax.set_xticks([i + 0.19 for i in range(len(caps))], [f"cap {c}" for c in caps])
        ax.set_ylabel("throughput, tok/s (batch 32; 0 = did not finish)")
        ax.set_title("layercake vs transformers + Accelerate disk offload")
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / "engines.png", dpi=110)
        made.append("engines.png")
    bound = [r for r in rows if r.get("fraction_of_bound") is not None]
    if bound:
        fig, ax = plt.subplots(figsize=(6, 4))
        labels = [f"{r['cap']} B={r['batch']}" for r in bound]
        ax.barh(range(len(bound)), [r["fraction_of_bound"] for r in bound])
        ax.set_yticks(range(len(bound)), labels, fontsize=8)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xlabel("fraction of the machine's bound (max(disk, FLOPs) per step)")
        fig.tight_layout()
        fig.savefig(folder / "bound.png", dpi=110)
        made.append("bound.png")
    plt.close("all")
    return made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--results",
        nargs="+",
        type=Path,
        help="JSON-lines files (default: results/offload-*.jsonl and planner-*.jsonl)",
    )
    ap.add_argument("--run", action="store_true", help="run offload.py and planner.py first")
    ap.add_argument("--out", type=Path, default=HERE / "report")
    a = ap.parse_args()
    results = HERE / "results"
    if a.run:
        files = [run("offload", ["--batches", "8", "32"], results), run("planner", [], results)]
    else:
        files = a.results or sorted(results.glob("offload-*.jsonl")) + sorted(
            results.glob("planner-*.jsonl")
        )
    rows = read(files)
    a.out.mkdir(parents=True, exist_ok=True)
    made = plots(rows, a.out)
    sources = ", ".join(f"`results/{f.name}`" for f in files)
    md = [
        "# layercake benchmark report",
        "",
        f"Generated by `benchmarks/report.py` from {sources}.",
        "",
    ]
    md += [f"![{m}]({m})" for m in made] + [""]
    md += planner_section(rows) + offload_section(rows)
    (a.out / "README.md").write_text("\n".join(md))
    print(f"wrote {a.out / 'README.md'} and {len(made)} plots")


if __name__ == "__main__":
    main()

"""``layercake bench``: generation speed of a model on this machine, in the spirit of llama-bench.

Every case (batch size x prompt length x generated length) runs in a fresh process with the
engine options the other commands take; the output is a table (or ``--json`` lines) with
prefill, decode and end-to-end tok/s (FlexGen's: generated tokens / (prefill + decode)), time
to first token, peak RSS, the bytes each token read from RAM and disk, and the fraction of
this machine's limits (RAM bandwidth, disk read rate, matmul peak at the step's row count,
measured once on their own and cached) each decode step reached.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

from layercake.errors import LayercakeError

COLUMNS = [  # header, key, format
    ("B", "batch", "{}"),
    ("prompt", "prompt_len", "{}"),
    ("gen", "gen_len", "{}"),
    ("load s", "load_s", "{:.2f}"),
    ("TTFT s", "ttft_s", "{:.3f}"),
    ("prefill t/s", "prefill_tok_s", "{:.1f}"),
    ("decode t/s", "decode_tok_s", "{:.1f}"),
    ("e2e t/s", "e2e_tok_s", "{:.1f}"),
    ("RSS MB", "peak_rss_mb", "{:.0f}"),
    ("RAM MB/tok", "ram_bytes_per_token", "{:.1f}", 1e-6),
    ("disk MB/tok", "disk_bytes_per_token", "{:.1f}", 1e-6),
    ("RAM bw", "ram_fraction", "{:.2f}"),
    ("disk", "disk_fraction", "{:.2f}"),
    ("matmul", "decode_matmul_fraction", "{:.2f}"),
    ("bound", "bound_fraction", "{:.2f}"),
]


def engine_options(a: argparse.Namespace) -> dict:
    """The parsed engine options, passed as they are to each case's ``load_from_args``."""
    skip = {"func", "command", "batches", "prompt_lens", "gen_lens", "repetitions", "json",
            "no_warmup", "timeout", "remeasure", "verbose"}  # fmt: skip
    return {k: v for k, v in vars(a).items() if k not in skip}


def run_one(spec: dict, timeout: float | None) -> dict:
    """One case in a fresh process; its JSON line, or an error record (never a traceback)."""
    cmd = [sys.executable, "-m", "layercake.bench.case", json.dumps(spec)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=os.environ)
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after {timeout} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = [ln for ln in p.stderr.strip().splitlines() if ln.strip()][-1:]
        why = "killed (out of memory?)" if p.returncode in (-9, 137) else f"exit {p.returncode}"
        return {"error": f"{why}: {tail[0] if tail else 'no output'}"}
    return json.loads(lines[-1])


def format_row(rec: dict) -> list[str]:
    out = []
    for col in COLUMNS:
        v = rec.get(col[1])
        if v is None:
            out.append("-")
        else:
            out.append(col[2].format(v * col[3] if len(col) > 3 else v))
    return out


def print_table(rows: list[list[str]]) -> None:
    head = [c[0] for c in COLUMNS]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    print("| " + " | ".join(h.rjust(w) for h, w in zip(head, widths)) + " |")
    print("|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(v.rjust(w) for v, w in zip(r, widths)) + " |", flush=True)


def run_bench(a: argparse.Namespace) -> int:
    """Every case in its own process; a table or JSON lines on stdout."""
    from layercake.bench.limits import machine_limits

    if min(a.batches + a.prompt_lens + a.gen_lens) < 1:
        raise LayercakeError("batch sizes, prompt and generated lengths must be at least 1")
    if a.threads:  # the limits are measured (once, cached) with the cases' thread count
        import torch

        torch.set_num_threads(a.threads)
    limits = machine_limits(Path(a.offload_dir) if a.offload_dir else None, a.remeasure)
    model = a.model or "embedded SmolLM2-135M-Instruct"
    if not a.json:
        print(f"model: {model}; limits: RAM {limits.ram_gbps} GB/s, disk {limits.disk_gbps} GB/s, "
              f"matmul GFLOP/s by rows {limits.matmul_gflops}")  # fmt: skip
    rows, failed = [], 0
    for B, P, G in itertools.product(a.batches, a.prompt_lens, a.gen_lens):
        spec = dict(engine=engine_options(a), batch=B, prompt_len=P, gen_len=G,
                    repetitions=a.repetitions, warmup=not a.no_warmup)  # fmt: skip
        rec = {"bench": "layercake-bench", "model": model, **run_one(spec, a.timeout)}
        rec.setdefault("batch", B)
        rec.setdefault("prompt_len", P)
        rec.setdefault("gen_len", G)
        failed += "error" in rec
        if a.verbose and "error" not in rec:  # the same two lines as generate -v, per case
            print(f"B={B} prompt={P} gen={G}: [path: {rec.get('path')}]\n  {rec.get('roofline')}",
                  file=sys.stderr, flush=True)  # fmt: skip
        if a.json:
            print(json.dumps(rec), flush=True)
        elif "error" in rec:
            print(f"B={B} prompt={P} gen={G}: {rec['error']}", file=sys.stderr)
        else:
            rows.append(format_row(rec))
    if rows and not a.json:
        print_table(rows)
    return 1 if failed else 0


def add_bench_command(sub: argparse._SubParsersAction, add_engine_options, add_verbose) -> None:
    """The ``bench`` subcommand: its own options plus every engine option."""
    p = sub.add_parser(
        "bench",
        help="measure generation speed against this machine's limits (like llama-bench)",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument("--batches", "-b", nargs="+", type=int, default=[1],
                   help="sequences generated together (default 1)")  # fmt: skip
    p.add_argument("--prompt-lens", "-p", nargs="+", type=int, default=[32],
                   help="prompt tokens (default 32)")  # fmt: skip
    p.add_argument("--gen-lens", "-n", nargs="+", type=int, default=[32],
                   help="generated tokens (default 32)")  # fmt: skip
    p.add_argument("--repetitions", "-r", type=int, default=3,
                   help="timed runs per case after a warm-up; the median is reported")  # fmt: skip
    p.add_argument("--no-warmup", action="store_true", help="time the first run too")
    p.add_argument("--timeout", type=float, help="stop a case after this many seconds")
    p.add_argument("--json", action="store_true", help="one JSON line per case")
    p.add_argument("--remeasure", action="store_true",
                   help="measure this machine's limits again (they are cached)")  # fmt: skip
    add_verbose(p)
    add_engine_options(p)
    p.set_defaults(func=run_bench)

"""The batch job's memory with a few long lines among short ones: ``layercake batch`` run as a user
runs it (the CLI in a fresh process, default options), on the embedded model.

Each case writes ``--short`` lines of ~20 tokens plus one line of ``--long`` tokens, 16 new tokens
each (greedy, EOS ignored), and runs the job once per repeat. It records the job's own summary
(tok/s, prefill and decode) with the wall time and the child's peak RSS (``ru_maxrss`` of the
waited child from ``wait4``, so the whole process is counted). One JSON line per run.

  python benchmarks/batch_memory.py                          # both cases, 2 repeats
  python benchmarks/batch_memory.py --cases 4000:16 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = (
    "the cake layer oven flour sugar butter egg milk cream berry apple lemon honey salt bake "
    "slice plate table kitchen recipe chef morning evening river mountain city train window"
).split()


def write_input(path: Path, short: int, long_tokens: int, seed: int = 0) -> None:
    """``short`` lines of ~20 tokens and one line of ``long_tokens`` token ids, in the middle."""
    rng = random.Random(seed)
    lines = [
        {"id": f"s{i}", "prompt": " ".join(rng.choice(WORDS) for _ in range(18))}
        for i in range(short)
    ]
    # token ids, so the length is exact whatever the tokenizer does with words
    ids = [rng.randrange(1000, 40000) for _ in range(long_tokens)]
    lines.insert(short // 2, {"id": "long", "prompt": ids})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))


def run_case(long_tokens: int, batch: int, short: int, gen: int, tmp: Path) -> dict:
    inp, out = tmp / "in.jsonl", tmp / "out.jsonl"
    write_input(inp, short, long_tokens)
    out.unlink(missing_ok=True)
    cli = [sys.executable, "-c", "from layercake.cli import main; main()"]
    cmd = cli + ["batch", "--input", str(inp), "--output", str(out)]
    cmd += ["--batch-size", str(batch), "--max-new-tokens", str(gen), "--ignore-eos"]
    t0 = time.perf_counter()
    with (tmp / "stdout").open("w+") as so, (tmp / "stderr").open("w+") as se:
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak, not all children's
        wall = time.perf_counter() - t0
        so.seek(0), se.seek(0)
        stdout, stderr = so.read(), se.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"batch failed ({status}): {stderr[-2000:]}")
    peak_kb = usage.ru_maxrss
    summary = json.loads(stdout.strip().splitlines()[-1])
    results = [json.loads(x) for x in out.read_text().splitlines()]
    return {
        "bench": "batch_memory",
        "long_tokens": long_tokens,
        "short_lines": short,
        "batch_size": batch,
        "gen_len": gen,
        "wall_s": round(wall, 2),
        "peak_rss_gb": round(peak_kb * 1024 / 1e9, 3),
        "job_peak_rss_gb": summary.get("peak_rss_gb"),
        "tok_s": summary.get("throughput_tok_s"),
        "prefill_tok_s": summary.get("prefill_tok_s"),
        "decode_tok_s": summary.get("decode_tok_s"),
        "results": len(results),
        "errors": sum("error" in r for r in results),
        "threads": os.environ.get("OMP_NUM_THREADS", "default"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--cases",
        nargs="+",
        default=["4000:16", "7900:32"],
        help="LONG_TOKENS:BATCH_SIZE pairs (the README's cases by default)",
    )
    ap.add_argument("--short", type=int, default=40)
    ap.add_argument("--gen-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        # cases alternate within a repeat, each run in its own process
        for r in range(a.repeats):
            for case in a.cases:
                long_tokens, batch = map(int, case.split(":"))
                rec = run_case(long_tokens, batch, a.short, a.gen_len, Path(d))
                rec["repeat"] = r
                print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()

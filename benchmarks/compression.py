"""Compressed weights in the disk-bound offload case: uncompressed vs int4 (and int8), same run.

The random Llama-3.2-1B-shaped bf16 checkpoint (2.5 GB) under ``memlimit --drop-caches 1.6G``
(the page cache counts, and starts cold); each case runs in its own process through
``benchmarks/offload.py``'s worker; each compressed case twice, placed by the cap and with all
weights on disk (streamed every step). One JSON line per case (FlexGen's throughput, prefill and
decode tok/s, bytes read per step, peak memory, the time spent dequantizing per step and per
layer), then one line with the ratios to the uncompressed run: of the generation's throughput,
and of the wall-clock one that counts loading (quantizing the weights) too.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from generation import model_path  # noqa: E402
from offload import DEFAULT_OFFLOAD, measure_machine, report, run_case  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cap", default="1600M", help="memory cap, page cache included")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=0, help="micro-batch size (0: whole)")
    ap.add_argument("--bits", nargs="+", type=int, default=[4], help="compressed cases")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--offload-dir", type=Path, default=DEFAULT_OFFLOAD)
    ap.add_argument("--model", default="llama1b", help="llama1b (default) or a model path")
    a = ap.parse_args()
    a.percent, a.accelerate_fraction, a.compress_bits, a.in_memory = None, 0.5, 4, False
    model_path("llama1b")  # written once to the cache
    # prepare the uncompressed disk layout once (a compressed one that fits stays in RAM)
    a.compress_weight, a.percent, gen = False, [0, 0, 100, 0, 100, 0], a.gen_len
    a.gen_len = 2
    prep = run_case(a, "layercake", 1, None)
    a.percent, a.gen_len = None, gen
    if "error" in prep:
        raise SystemExit(f"preparing failed: {prep}")
    machine = measure_machine(a.offload_dir, a.threads)
    print(json.dumps({"bench": "compression-machine", **machine}), flush=True)
    results = {}
    # each compressed case twice: placed by the cap (what fits stays in RAM), and all on disk
    # (streamed every step: the per-layer preparation time of the compressed form is measured)
    cases = [(None, None)] + [(b, p) for b in a.bits for p in (None, [0, 0, 100, 0, 100, 0])]
    for bits, percent in cases:
        a.compress_weight, a.compress_bits, a.percent = bits is not None, bits or 4, percent
        r = run_case(a, "layercake", a.batch, a.cap)
        rec = report(a, "layercake", a.batch, a.cap, r, machine, None)
        name = f"int{bits}" if bits else "bf16"
        name += "-all-disk" if percent else ""
        rec["bench"], rec["weights"] = "compression", name
        results[name] = rec
        print(json.dumps(rec), flush=True)
    base = results["bf16"]
    for name, rec in results.items():
        if name != "bf16" and "throughput_tok_s" in rec and "throughput_tok_s" in base:
            ratio = rec["throughput_tok_s"] / base["throughput_tok_s"]
            wall = rec["throughput_incl_load_tok_s"] / base["throughput_incl_load_tok_s"]
            print(json.dumps({"bench": "compression-ratio", "weights": name,
                              "throughput_over_bf16": round(ratio, 2),
                              "throughput_incl_load_over_bf16": round(wall, 2)}))  # fmt: skip


if __name__ == "__main__":
    main()

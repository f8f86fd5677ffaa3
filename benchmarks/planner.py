"""Does the planner pick well? The planned policy against hand-picked ones, measured in one run.

On the random Llama-3.2-1B-shaped checkpoint under ``memlimit --drop-caches CAP`` (page cache
counted, cold start), each case runs in its own process through ``offload.py``'s worker: several
hand-picked policies (batch sizes and micro-batches placed by the budget, all weights on disk,
int4 weights) and ``policy="auto"``. The planner's inputs are measured first, here (machine rates
and unit times, cached for the workers), and every case also gets the cost model's prediction
for the policy it really ran. One JSON line per case, then a summary line: the planned
throughput over the best hand-picked one, and each prediction's error.

Run it under the benchmark lock, e.g.
``flock /tmp/layercake-bench.lock .venv/bin/python benchmarks/planner.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from generation import model_path  # noqa: E402
from offload import DEFAULT_OFFLOAD, run_case  # noqa: E402

# name: (micro-batch, micro-batches, percent or None for the budget's placement, int4 weights)
CASES = {
    "8x1": (8, 1, None, False),
    "16x1": (16, 1, None, False),
    "32x1": (32, 1, None, False),
    "64x1": (64, 1, None, False),
    "32x2": (32, 2, None, False),
    "16x4": (16, 4, None, False),
    "8x8": (8, 8, None, False),
    "32x1-all-disk": (32, 1, [0, 0, 100, 0, 100, 0], False),
    "32x1-int4": (32, 1, None, True),
}


def case_args(a: argparse.Namespace, bs: int, percent, int4: bool, auto: bool):
    c = argparse.Namespace(**vars(a))
    c.micro_batch, c.percent, c.compress_weight, c.compress_bits = bs, percent, int4, 4
    c.policy, c.in_memory, c.accelerate_fraction = ("auto" if auto else None), False, 0.5
    return c


def predict(models, machine, w, r: dict, base: int, bs: int, nb: int) -> dict:
    """The cost model's prediction for the policy the worker really ran."""
    from layercake.offload.planner import evaluate
    from layercake.offload.policy import Policy

    int4 = bool(r.get("dequant_ms_per_layer") is not None or "int4" in json.dumps(r.get("plan")))
    m = next((m for m in models if (m.compress is not None) == int4), models[0])
    if "percent" not in r:  # the in-memory runner
        if "plan" in r:
            bs, nb = r["plan"]["batch_size"], r["plan"]["num_batches"]
        fp = m.footprint(bs, nb, w.context)
        return evaluate(m, fp, machine, w, Policy(100, 0, 100, 0, 100, 0, bs, nb), False, base,
                        resident=True).to_json()  # fmt: skip
    n = sum(1 for u in m.units if u.kind == "layer")
    kv = 100.0 * (n - r["kv_layers_on_disk"]) / n
    p = r["percent"]
    policy = Policy(p[0], p[1], kv, 0, p[4], p[5], r["micro_batch"], r["num_batches"])
    fp = m.footprint(policy.batch_size, policy.num_batches, w.context)
    return evaluate(m, fp, machine, w, policy, False, base).to_json()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama1b", help="llama1b (default) or a model path")
    ap.add_argument("--cap", default="1600M")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--max-sequences", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--offload-dir", type=Path, default=DEFAULT_OFFLOAD)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--no-compression", action="store_true", help="plan lossless only")
    ap.add_argument("--remeasure", action="store_true", help="measure the machine again")
    a = ap.parse_args()
    a.allow_compression = not a.no_compression
    torch.set_num_threads(a.threads)
    from layercake.checkpoint import open_checkpoint
    from layercake.config import load_config
    from layercake.models.parts import Parts
    from layercake.offload.auto import planning_inputs
    from layercake.offload.planner import Workload, search
    from layercake.offload.policy import parse_bytes
    from layercake.options import Options
    from layercake.quant import compression

    path = model_path(a.model)
    t0 = time.perf_counter()
    layouts = [False] + ([True] if a.allow_compression or any(CASES[c][3] for c in a.cases) else [])
    for int4 in layouts:  # the disk layouts, written once (or found), outside the cap
        c = case_args(a, 1, [0, 0, 100, 0, 100, 0], int4, False)
        c.prompt_len, c.gen_len = 4, 2
        prep = run_case(c, "layercake", 1, None)
        if "error" in prep:
            raise SystemExit(f"preparing the offload layout failed: {prep}")
    ckpt = open_checkpoint(path)
    config = load_config(ckpt.config_dict())
    w = Workload(a.prompt_len, a.gen_len, a.max_sequences)
    choices = [None] + ([compression(True)] if a.allow_compression else [])
    o = Options(offload_dir=a.offload_dir)
    parts = Parts.full(config.num_hidden_layers)
    models, machine, base = planning_inputs(o, ckpt, config, parts, w, choices, a.remeasure)
    plan = search(models, machine, w, parse_bytes(a.cap), None, False, base, a.offload_dir)
    print(json.dumps({"bench": "planner-machine", "disk_gbps": machine.disk_gbps,
                      "matmul_gflops": machine.matmul_gflops, "plan": plan.to_json(),
                      "setup_s": round(time.perf_counter() - t0, 1)}), flush=True)  # fmt: skip
    rows = []
    runs = [(c, *CASES[c], False) for c in a.cases] + [("planned", 0, 0, None, False, True)]
    for name, bs, nb, percent, int4, auto in runs:
        B = a.max_sequences if auto else bs * nb
        r = run_case(case_args(a, bs, percent, int4, auto), "layercake", B, a.cap)
        rec = {"bench": "planner", "case": name, "cap": a.cap, "prompt_len": a.prompt_len,
               "gen_len": a.gen_len}  # fmt: skip
        if "error" in r:
            rec.update(error=r["error"], stderr_tail=r.get("stderr_tail"))
            print(json.dumps(rec), flush=True)
            continue
        B = r.get("batch", B)
        total = r["prefill_s"] + r["decode_s"]
        pred = predict(models, machine, w, r, base, bs, nb)
        rec.update(
            policy=r["policy"],
            block=B,
            int4=bool(int4 or (auto and r["plan"]["compress_weight"])),
            measured_tok_s=round(B * a.gen_len / total, 2),
            predicted_tok_s=pred["predicted_tok_s"],
            planner_predicted_tok_s=r["plan"]["predicted_tok_s"] if auto else None,
            prefill_s=round(r["prefill_s"], 2),
            predicted_prefill_s=pred["predicted_prefill_s"],
            decode_step_s=round(r["decode_s"] / max(1, r["steps"] - 1), 3),
            predicted_decode_step_s=pred["predicted_decode_step_s"],
            peak_mb=round(r["peak_bytes"] / 2**20, 1) if r.get("peak_bytes") else None,
            peak_rss_mb=round(r["rss_hwm_bytes"] / 2**20, 1),
            predicted_memory_mb=round(pred["predicted_memory_bytes"] / 2**20, 1),
            gb_read=round(r.get("bytes_read", 0) / 1e9, 2),
            kv_layers_on_disk=r.get("kv_layers_on_disk", 0),
        )
        rec["prediction_error"] = round(rec["predicted_tok_s"] / rec["measured_tok_s"] - 1, 3)
        rows.append(rec)
        print(json.dumps(rec), flush=True)
    hand = [r for r in rows if r["case"] != "planned"]
    planned = next((r for r in rows if r["case"] == "planned"), None)
    if hand and planned:
        best = max(hand, key=lambda r: r["measured_tok_s"])
        print(json.dumps({
            "bench": "planner-summary", "cap": a.cap, "best_hand_picked": best["case"],
            "best_tok_s": best["measured_tok_s"], "planned_tok_s": planned["measured_tok_s"],
            "planned_over_best": round(planned["measured_tok_s"] / best["measured_tok_s"], 3),
            "planned_prediction_error": planned["prediction_error"],
            "max_abs_prediction_error": max(abs(r["prediction_error"]) for r in rows),
            "wall_s": round(time.perf_counter() - t0, 1),
        }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

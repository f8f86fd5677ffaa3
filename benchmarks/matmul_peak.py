"""The matmul rate this machine reaches on the Llama-3.2-1B-shaped model's own linear layers, at
the row counts of ``generation.py``'s B=32 case (32 rows a decode step, 1024 a prefill of 32
prompts of 32 tokens): fp32 (MKL's GEMM: what transformers runs), bf16 x bf16 (lossy:
activations rounded to bf16), and layercake's fp32-times-bf16 kernels (``--dtypes amx_bf16x3
bf16_mm``: the ``bf16`` form's AMX tiles with fp32 products, and its AVX2 kernel). One JSON
line per (dtype, rows): each layer shape's GFLOP/s (best of ``--passes``) and the model's
effective rate (its FLOPs a token over the time a token's products take at those rates; the
head only at decode's row count: a prefill runs it on each prompt's last position).

  flock /tmp/layercake-bench.lock python benchmarks/matmul_peak.py
  flock /tmp/layercake-bench.lock python benchmarks/matmul_peak.py --rows 1 2 4 8 32 256 1024 \
      --dtypes float32 amx_bf16x3 bf16_mm   # where the bf16 form switches kernels
  python benchmarks/matmul_peak.py --judge benchmarks/results/roofline-b32-2026-12-03.jsonl

Run it in the same hold as ``generation.py --models llama1b --batches 32`` to judge that run:
time >= FLOPs / this rate; a run at 0.95 of it has no lossless headroom left. ``--judge FILE``
reads both kinds of lines from one file and prints, for each generation run, the GFLOP/s its
prefill and decode reached and their fractions of the fp32 rates measured in that file.
"""

from __future__ import annotations

import argparse
import json
import time

HIDDEN, INTER, KV, VOCAB, LAYERS = 2048, 8192, 512, 128256, 16
# (name, in, out, count per token): q/o, k/v, gate/up, down per layer; the head once
SHAPES = [("q_o", HIDDEN, HIDDEN, 2 * LAYERS), ("k_v", HIDDEN, KV, 2 * LAYERS),
          ("gate_up", HIDDEN, INTER, 2 * LAYERS), ("down", INTER, HIDDEN, LAYERS),
          ("head", HIDDEN, VOCAB, 1)]  # fmt: skip


# fp32 activations times bf16 weights on layercake's kernels (the ``bf16`` form's two paths)
OURS = ("amx_bf16x3", "bf16_mm")


def rate(rows: int, k: int, n: int, dtype: str, passes: int) -> float:
    """GFLOP/s of ``(rows x k) @ (k x n)`` as a linear layer runs it (x @ W.T), best pass:
    ``dtype`` float32 / bfloat16 on ``F.linear``, or one of ``OURS`` (x fp32, W bf16)."""
    import torch

    from layercake.ops import kernels

    ours = dtype in OURS
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, k, generator=g, dtype=torch.float32 if ours else getattr(torch, dtype))
    w = torch.randn(n, k, generator=g, dtype=x.dtype).mul_(0.02)
    fn = torch.nn.functional.linear
    if ours:
        w = w.bfloat16()
        fn = kernels.bf16x3_mm if dtype == "amx_bf16x3" else kernels.bf16_mm
    fn(x, w)  # first call: allocation, MKL's dispatch
    flops, best = 2 * rows * k * n, 0.0
    reps = max(1, int(2e10 // flops))  # ~0.1-0.2 s a pass
    for _ in range(passes):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn(x, w)
        best = max(best, reps * flops / (time.perf_counter() - t0) / 1e9)
    return best


def judge(path: str) -> None:
    """Each 1B generation run in ``path`` against the fp32 rates measured beside it (the best
    of the file's passes), from the same FLOP count for both engines."""
    lines = [json.loads(x) for x in open(path) if x.startswith("{")]
    rates: dict[int, float] = {}
    for r in lines:
        if r.get("bench") == "matmul_peak" and r["dtype"] == "float32":
            rates[r["rows"]] = max(rates.get(r["rows"], 0.0), r["model_gflops"])
    layers = sum(2 * k * n * c for name, k, n, c in SHAPES if name != "head")
    head = 2 * HIDDEN * VOCAB
    for r in lines:
        if r.get("bench") != "generation" or r.get("line") != "run" or r.get("model") != "llama1b":
            continue
        B, P, gen = r["batch"], r["prompt_len"], r["gen_len"]
        pre_s, dec_s = B * P / r["prefill_tok_s"], B * (gen - 1) / r["decode_tok_s"]
        pre = (layers * B * P + head * B) / pre_s / 1e9  # the head on each last position
        dec = (layers + head) * B * (gen - 1) / dec_s / 1e9
        print(json.dumps(dict(engine=r["engine"], throughput_tok_s=r["throughput_tok_s"],
                              prefill_gflops=round(pre, 1), decode_gflops=round(dec, 1),
                              prefill_of_fp32_rate=round(pre / rates[B * P], 3),
                              decode_of_fp32_rate=round(dec / rates[B], 3),
                              fp32_rates=rates)))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", nargs="+", type=int, default=[32, 1024])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                    choices=["float32", "bfloat16", *OURS])  # fmt: skip
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--no-head", action="store_true", help="leave the 128256-row head out")
    ap.add_argument("--judge", help="a results file: its generation runs against its rates")
    a = ap.parse_args()
    if a.judge:
        return judge(a.judge)
    import torch

    torch.set_num_threads(a.threads)
    for dt in a.dtypes:
        for rows in a.rows:
            # a prefill computes the head on each prompt's last position only: not at its rows
            no_head = a.no_head or rows > 64
            shapes = [s for s in SHAPES if not (no_head and s[0] == "head")]
            per = {name: round(rate(rows, k, n, dt, a.passes), 1)
                   for name, k, n, _ in shapes}  # fmt: skip
            flops = sum(2 * k * n * c for _, k, n, c in shapes)  # a token's
            secs = sum(2 * k * n * c / (per[name] * 1e9) for name, k, n, c in shapes)
            print(json.dumps(dict(bench="matmul_peak", dtype=dt, rows=rows, threads=a.threads,
                                  gflops=per, model_gflops=round(flops / secs / 1e9, 1),
                                  model_flops_per_token=flops)), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

"""Where an in-memory batched generation's time goes: prefill vs decode, and each linear weight
form's speed at the step's row count against fp32 MKL on the same shape (one JSON line each).

  python benchmarks/profile_batch.py                         # Llama-1B-shaped bf16, B=32
  python benchmarks/profile_batch.py --model smollm2 --batch 8 --exact

Lines: ``generate`` (prefill / decode seconds and tok/s), ``matmul`` (per weight shape and row
count: our kernel's GFLOP/s as the model holds the weight, and MKL's on an fp32 copy) and
``ops`` (the decode step's top operators by self time, from torch.profiler).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def timed(fn, reps: int, *args) -> float:
    fn(*args)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(*args)
    return (time.perf_counter() - t0) / reps


def matmul_lines(model, rows_list: list[int], reps: int) -> None:
    """Each distinct linear shape once: its held form vs fp32 ``F.linear`` (MKL)."""
    import torch

    from layercake.ops.linear import describe, form_of

    seen = set()
    for name, m in model.named_modules():
        if form_of(m) is None:
            continue
        w = getattr(m, "weight", None)
        N, K = tuple(w.shape)
        if (N, K) in seen:
            continue
        seen.add((N, K))
        dense = torch.randn(N, K) * 0.02
        for rows in rows_list:
            x = torch.randn(rows, K)
            with torch.inference_mode():
                ours = timed(m, reps, x)
                mkl = timed(torch.nn.functional.linear, reps, x, dense)
            flop = 2 * rows * N * K
            print(
                json.dumps(
                    dict(
                        line="matmul",
                        module=name,
                        form=describe(w),
                        rows=rows,
                        n=N,
                        k=K,
                        ours_gflops=round(flop / ours / 1e9, 1),
                        mkl_fp32_gflops=round(flop / mkl / 1e9, 1),
                    )
                ),
                flush=True,
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama1b")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--exact", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip", nargs="*", default=[], choices=["generate", "matmul", "ops"])
    a = ap.parse_args()
    import torch

    import layercake
    from layercake.bench.roofline import runner_path

    sys.path.insert(0, str(HERE))
    from generation import model_path, prompts

    torch.set_num_threads(a.threads)
    llm = layercake.load(model_path(a.model), exact=a.exact)
    print(json.dumps(dict(line="path", path=runner_path(llm.runner))), flush=True)
    ids = prompts(a.batch, a.prompt_len, llm.runner.vocab_size).tolist()
    if "generate" not in a.skip:
        llm.generate(ids, max_new_tokens=2, ignore_eos=True)  # warm-up
        llm.generate(ids, max_new_tokens=a.gen_len, ignore_eos=True)
        s = llm.last_stats
        print(
            json.dumps(
                dict(
                    line="generate",
                    batch=a.batch,
                    prefill_s=round(s.prefill_s, 3),
                    decode_s=round(s.decode_s, 3),
                    decode_steps=s.decode_steps,
                    step_s=round(s.decode_s / max(1, s.decode_steps), 4),
                    prefill_tok_s=round(s.prefill_tok_s, 1),
                    decode_tok_s=round(s.decode_tok_s, 1),
                )
            ),
            flush=True,
        )
    if "matmul" not in a.skip:
        for sl in llm.runner.slices:
            matmul_lines(sl, [a.batch, a.batch * a.prompt_len], a.reps)
    if "ops" not in a.skip:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            llm.generate(ids, max_new_tokens=3, ignore_eos=True)
        rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]
        for e in rows:
            print(
                json.dumps(
                    dict(
                        line="ops",
                        op=e.key,
                        calls=e.count,
                        self_ms=round(e.self_cpu_time_total / 1e3, 1),
                    )
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()

"""One ``layercake bench`` case, in its own process (so its peak RSS and its page faults are its
own): ``python -m layercake.bench.case '<json>'`` prints one JSON line.

The JSON holds the engine options (as the CLI parsed them: they go through the same
``load_from_args`` as every command) and the case: batch, prompt_len, gen_len, repetitions,
warmup.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

import torch


def prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Random token ids (as llama-bench's), the same for every engine and run."""
    g = torch.Generator().manual_seed(seed)
    hi = max(2, min(vocab, 32000))
    return torch.randint(min(100, hi - 1), hi, (batch, length), generator=g).tolist()


def disk_bytes(runner) -> int:
    """Bytes the offload runner's loader has read from disk so far (0 in memory)."""
    return int(getattr(runner, "bytes_read", 0) or 0)


def run_case(spec: dict) -> dict:
    """Load, warm up, then time ``repetitions`` generations; the median end-to-end run's
    figures, with the spread of the repetitions."""
    from layercake.bench.limits import machine_limits
    from layercake.bench.roofline import (
        format_roofline,
        head_params,
        linear_params,
        roofline,
        runner_path,
        weight_bytes,
    )
    from layercake.cli import load_from_args

    a = argparse.Namespace(**spec["engine"])
    B, P, G = spec["batch"], spec["prompt_len"], spec["gen_len"]
    t0 = time.perf_counter()
    llm = load_from_args(a, max_sequences=B)
    load_s = time.perf_counter() - t0
    ids = prompts(B, P, llm.runner.vocab_size)
    r = llm.runner
    warmup_s = 0.0
    if spec.get("warmup", True):  # kernels, allocator, a compiled step: not in the timing
        t0 = time.perf_counter()
        llm.generate(ids, max_new_tokens=min(G, 4), ignore_eos=True)
        warmup_s = time.perf_counter() - t0
    runs = []
    for _ in range(max(1, spec.get("repetitions", 1))):
        d0 = disk_bytes(r)
        llm.generate(ids, max_new_tokens=G, ignore_eos=True)
        s = llm.last_stats
        runs.append((s, disk_bytes(r) - d0))
    runs.sort(key=lambda x: x[0].throughput)
    s, disk = runs[len(runs) // 2]
    limits = machine_limits(getattr(r, "offload_dir", None))
    steps = s.decode_steps
    # the disk bytes of the decode steps: a step reads the units' disk rows once
    disk_step = getattr(r, "disk_bytes", 0) if disk else 0
    run = dict(batch=B, prompt_len=P, prefill_s=s.prefill_s, decode_s=s.decode_s,
               decode_steps=steps, params=linear_params(r), head_params=head_params(r),
               ram_bytes_per_step=weight_bytes(r),
               disk_bytes_per_step=disk_step)  # fmt: skip
    ram = run["ram_bytes_per_step"]
    fractions = roofline(run, limits)
    rec = dict(
        batch=B,
        prompt_len=P,
        gen_len=G,
        runner=type(r).__name__,
        policy=str(getattr(r, "policy", "")) or None,
        load_s=round(load_s, 3),
        warmup_s=round(warmup_s, 3),
        ttft_s=round(s.prefill_s, 4),
        prefill_tok_s=round(s.prefill_tok_s, 2),
        decode_tok_s=round(s.decode_tokens / s.decode_s, 2) if s.decode_s > 0 else None,
        e2e_tok_s=round(s.throughput, 2),
        e2e_tok_s_runs=[round(x.throughput, 2) for x, _ in runs],
        e2e_tok_s_stdev=round(statistics.stdev([x.throughput for x, _ in runs]), 2)
        if len(runs) > 1
        else None,
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        ram_bytes_per_token=round(ram / B) if ram else None,
        disk_bytes_per_token=round(disk / s.generated_tokens) if s.generated_tokens else 0,
        disk_bytes_read=disk,
        limits=dict(
            ram_gbps=limits.ram_gbps, disk_gbps=limits.disk_gbps, matmul_gflops=limits.matmul_gflops
        ),  # fmt: skip
        **fractions,
        path=runner_path(r),
        roofline=format_roofline(fractions, limits, B),
    )
    llm.close()
    return rec


def main() -> None:
    spec = json.loads(sys.argv[1])
    threads = spec["engine"].get("threads")
    if threads:  # before anything runs: the limits are keyed by the thread count
        torch.set_num_threads(threads)
    print(json.dumps(run_case(spec)), flush=True)


if __name__ == "__main__":
    main()

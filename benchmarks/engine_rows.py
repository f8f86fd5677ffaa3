"""What a continuous-batching step costs for the rows that are live: the engine (``Engine``, as
the server and the batch job run it) on the embedded model, in one process, with 1 slot and 1
stream, 8 slots and 1 stream, 8 slots and 8 streams, each with the live rows compacted (the
default) and with every slot stepped (``"compact": false``, the engine before compaction),
alternating; one JSON line per run, then the medians.

  flock /tmp/layercake-bench.lock python benchmarks/engine_rows.py --repeats 3
  flock /tmp/layercake-bench.lock python benchmarks/engine_rows.py --compile --repeats 3
  flock /tmp/layercake-bench.lock python benchmarks/engine_rows.py --threads 1 --profile

``--profile``: instead, where an 8-row decode step's time goes (``torch.profiler`` over 10
steps of 8 streams that joined apart): one line per op with its self time per step.

``tok_s`` is generated tokens over the wall time of ``Engine.run`` (prefill included);
``step_ms`` the median decode step; ``forward_ms`` the median time of its forward alone (the
rest is sampling and the engine's own work). Streams join one per step (``"apart"``, as a
server's requests arrive: each its own sampler group) unless ``--together``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

CASES = [(1, 1), (8, 1), (8, 8)]  # (slots, live streams)


def run_case(llm, slots: int, live: int, compact: bool, a: argparse.Namespace) -> dict:  # noqa: ANN001
    import torch

    from layercake.engine import Engine, Request, default_capacity
    from layercake.sampling import SamplingParams

    eng = Engine(llm.runner, llm.eos_token_ids, llm._decode, slots, default_capacity(a.context))
    if not compact:
        eng.compacts, eng.buckets = False, None
    forward, fwd = llm.runner.forward, []

    def timed(tokens, *rest, **kw):  # noqa: ANN001, ANN002, ANN003
        t0 = time.perf_counter()
        out = forward(tokens, *rest, **kw)
        if tokens.shape[1] == 1:
            fwd.append(time.perf_counter() - t0)
        return out

    llm.runner.forward = timed
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.0, max_new_tokens=a.tokens, ignore_eos=True)
    reqs = [Request(torch.randint(100, 20000, (a.prompt,), generator=g).tolist(), params)
            for _ in range(live)]  # fmt: skip
    steps, events = [], 0
    t0 = time.perf_counter()
    for i, r in enumerate(reqs):
        eng.add(r)
        if not a.together and i < live - 1:
            events += len(eng.step())
    while eng.busy:
        s0 = time.perf_counter()
        events += len(eng.step())
        steps.append(time.perf_counter() - s0)
    wall = time.perf_counter() - t0
    llm.runner.forward = forward
    assert events == live * a.tokens, events
    return dict(bench="engine_rows", slots=slots, live=live, compact=compact,
                compile=a.compile, tokens=events, wall_s=round(wall, 3),
                tok_s=round(events / wall, 1),
                step_ms=round(1e3 * statistics.median(steps), 2),
                forward_ms=round(1e3 * statistics.median(fwd), 2))  # fmt: skip


def profile(llm, a: argparse.Namespace, steps: int = 10) -> None:  # noqa: ANN001
    """8 streams joined apart into 8 slots, then ``steps`` decode steps of all 8 rows under
    ``torch.profiler``: each op's self time per step, the busiest first."""
    import torch
    from torch.profiler import profile as torch_profile

    from layercake.engine import Engine, Request, default_capacity
    from layercake.sampling import SamplingParams

    eng = Engine(llm.runner, llm.eos_token_ids, llm._decode, 8, default_capacity(a.context))
    params = SamplingParams(temperature=0.0, max_new_tokens=steps + 16, ignore_eos=True)
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        eng.add(Request(torch.randint(100, 20000, (a.prompt,), generator=g).tolist(), params))
        eng.step()
    for _ in range(3):
        eng.step()
    with torch_profile() as p:
        for _ in range(steps):
            eng.step()
    total = sum(e.self_cpu_time_total for e in p.key_averages()) / 1e3 / steps
    print(json.dumps(dict(bench="engine_rows", line="profiled", rows=8, steps=steps,
                          ops_ms_per_step=round(total, 2))), flush=True)  # fmt: skip
    for e in sorted(p.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]:
        print(json.dumps(dict(bench="engine_rows", line="op", op=e.key, calls=e.count,
                              self_ms_per_step=round(e.self_cpu_time_total / 1e3 / steps, 3))),
              flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="default: the embedded model")
    ap.add_argument("--compile", action="store_true", help="compiled one-token steps (serve's)")
    ap.add_argument("--tokens", type=int, default=64, help="generated per stream")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per stream")
    ap.add_argument("--context", type=int, default=1024, help="the engine's --max-context")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--together", action="store_true", help="admit the streams in one group")
    ap.add_argument("--profile", action="store_true", help="ops' time in an 8-stream run")
    a = ap.parse_args()
    import torch

    import layercake

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    llm = layercake.load(a.model, compile=a.compile)
    print(json.dumps(dict(bench="engine_rows", line="load", load_s=round(time.perf_counter() - t0,
                          2), path=llm.runner.describe())), flush=True)  # fmt: skip
    if a.profile:
        return profile(llm, a)
    variants = [(s, n, c) for s, n in CASES for c in (True, False) if not (s == 1 and not c)]
    t0 = time.perf_counter()
    for s, n, c in variants:  # warm-up: every graph compiled, every allocation made
        run_case(llm, s, n, c, a)
    print(json.dumps(dict(bench="engine_rows", line="warmup", warmup_s=round(
        time.perf_counter() - t0, 1))), flush=True)  # fmt: skip
    runs: dict[tuple, list[dict]] = {v: [] for v in variants}
    for _ in range(a.repeats):  # alternating, so drift in the machine hits every case
        for v in variants:
            r = run_case(llm, *v, a)
            print(json.dumps({**r, "line": "run"}), flush=True)
            runs[v].append(r)
    for (s, n, c), rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("tok_s", "step_ms", "forward_ms")}
        print(json.dumps(dict(bench="engine_rows", line="median", slots=s, live=n, compact=c,
                              compile=a.compile, repeats=len(rs), **med,
                              tok_s_runs=[r["tok_s"] for r in rs])), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

"""moe11's split of the in-memory prompt pass, by timers at function boundaries both engines
have (torch.profiler distorted it: under it the rotary's element-wise ops took 30-44 ms where
they take 1-6 ms). moe9-inmem's setup: the OLMoE-shaped benchmark checkpoint at B=64 x 16 = 1024
rows, every weight in RAM through the offload runner, 2 threads, AMX; N passes of one generated
token, the first pass (a fresh process's, as a capped run's only prompt) reported apart from
the median of the others. One JSON line of seconds (and minor page faults) a pass:
attention (its linears on the tiles apart), router (gate linear, softmax/top-k), the experts'
products by rows per expert, silu-mul, the rest of ``grouped`` (gathers, copies, weighted sum,
binding), and the rest of the pass (embedding, norms, residuals, head). Run from the worktree,
the engine picked by PYTHONPATH:
  flock /tmp/layercake-bench.lock env PYTHONPATH=/tmp/moe11-new TAG=new \\
      .venv/bin/python benchmarks/results/moe-2026-12-04-moe11-split.py 4"""

import json
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, "benchmarks")
import torch  # noqa: E402
from generation import prompts  # noqa: E402
from moe_checkpoint import olmoe  # noqa: E402

import layercake  # noqa: E402
import layercake.offload.experts as xp  # noqa: E402
from layercake.models import llama, moe  # noqa: E402
from layercake.ops import kernels  # noqa: E402

torch.set_num_threads(2)
path = olmoe(6, 1.0)
vocab = json.loads((path / "config.json").read_text())["vocab_size"]
ids = prompts(64, 16, vocab)[:64]
llm = layercake.load(path, offload_dir="/var/tmp/moe7-offload", batch_size=64, num_batches=1,
                     percent=[0, 100, 100, 0, 100, 0])  # fmt: skip
T: dict[str, float] = {}
where = ["other"]


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(owner, name, key, inside=None):
    f = getattr(owner, name)

    def g(*a, **k):
        t0, f0 = time.perf_counter(), faults()
        prev = where[0]
        if inside:
            where[0] = inside
        try:
            return f(*a, **k)
        finally:
            where[0] = prev
            kk = key(a) if callable(key) else key
            T[kk] = T.get(kk, 0.0) + time.perf_counter() - t0
            T[kk + " faults"] = T.get(kk + " faults", 0) + faults() - f0

    setattr(owner, name, g)


def mm_key(a) -> str:
    if where[0] != "experts":
        return f"{where[0]} mm"
    rows = a[0].shape[0]
    b = next(b for b in (32, 64, 128, 256, 1 << 30) if rows <= b)
    return f"experts mm <={b if b < 1 << 30 else 'more'} rows"


timed(kernels, "bf16x3_mm", mm_key)
timed(kernels, "bf16_mm", mm_key)
timed(kernels, "silu_mul", "experts silu_mul")
timed(llama.Attention, "forward", "attention total", inside="attention")
timed(moe.Gate, "forward", "router gate")
timed(moe, "route", "router softmax/top-k")
timed(moe.SparseMoE, "forward", "moe total")
for owner in (moe, xp):
    timed(owner, "grouped", "grouped total", inside="experts")

n = int(sys.argv[1]) if len(sys.argv) > 1 else 4
passes = []
for _ in range(n):
    T.clear()
    f0 = faults()
    llm.generate(ids.tolist(), max_new_tokens=1, ignore_eos=True)
    t = dict(T, faults=faults() - f0, pass_s=llm.last_stats.prefill_s)
    mm = sum(v for k, v in t.items() if k.startswith("experts mm") and "faults" not in k)
    t["experts mm"] = mm
    t["grouped other"] = t["grouped total"] - mm - t.get("experts silu_mul", 0.0)
    t["attention other"] = t["attention total"] - t.get("attention mm", 0.0)
    t["moe other"] = t["moe total"] - t["grouped total"] - t["router gate"]
    t["moe other"] -= t["router softmax/top-k"]
    t["pass other"] = t["pass_s"] - t["attention total"] - t["moe total"]
    passes.append(t)
keys = sorted(passes[0])
rest = passes[1:] or passes
print(json.dumps(dict(
    tag=os.environ.get("TAG"), passes=n,
    first={k: round(passes[0][k], 4) for k in keys},
    median_of_rest={k: round(statistics.median(p.get(k, 0) for p in rest), 4) for k in keys},
)))  # fmt: skip

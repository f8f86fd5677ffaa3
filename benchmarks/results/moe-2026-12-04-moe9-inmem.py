"""moe9's in-memory timing of the prompt's pass: the OLMoE-shaped benchmark checkpoint at B=64 x
16 (1024 rows) with every weight in RAM (layercake-ram's setup: the offload runner, percent
0 100 100 0 100 0, the offload layout of /var/tmp/moe7-offload), 2 threads; N generations of one
token; one JSON line: each pass's prefill seconds and the process's minor page faults during it.
Run from the worktree, the engine picked by PYTHONPATH:
  flock /tmp/layercake-bench.lock env PYTHONPATH=/tmp/moe9-new TAG=new \\
      .venv/bin/python benchmarks/results/moe-2026-12-04-moe9-inmem.py 3"""

import json
import os
import resource
import sys

sys.path.insert(0, "benchmarks")
import torch  # noqa: E402
from generation import prompts  # noqa: E402
from moe_checkpoint import olmoe  # noqa: E402

import layercake  # noqa: E402

torch.set_num_threads(2)
path = olmoe(6, 1.0)
vocab = json.loads((path / "config.json").read_text())["vocab_size"]
ids = prompts(64, 16, vocab)[:64]
llm = layercake.load(path, offload_dir="/var/tmp/moe7-offload", batch_size=64, num_batches=1,
                     percent=[0, 100, 100, 0, 100, 0])  # fmt: skip
times, faults = [], []
for _ in range(int(sys.argv[1])):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    llm.generate(ids.tolist(), max_new_tokens=1, ignore_eos=True)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    times.append(round(llm.last_stats.prefill_s, 3))
print(json.dumps(dict(tag=os.environ.get("TAG"), prefill_s=times, minflt=faults)))

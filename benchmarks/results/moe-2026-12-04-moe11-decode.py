"""moe11's decode check in memory: the OLMoE-shaped benchmark checkpoint at B=8, prompt 16, 16
greedy tokens, every weight in RAM through the offload runner (moe9-inmem's setup), 2 threads;
N generations a process; one JSON line: each generation's decode seconds and prompt pass.
  flock /tmp/layercake-bench.lock env PYTHONPATH=/tmp/moe11-new TAG=new \\
      .venv/bin/python benchmarks/results/moe-2026-12-04-moe11-decode.py 3"""

import json
import os
import sys

sys.path.insert(0, "benchmarks")
import torch  # noqa: E402
from generation import prompts  # noqa: E402
from moe_checkpoint import olmoe  # noqa: E402

import layercake  # noqa: E402

torch.set_num_threads(2)
path = olmoe(6, 1.0)
vocab = json.loads((path / "config.json").read_text())["vocab_size"]
ids = prompts(8, 16, vocab)[:8]
llm = layercake.load(path, offload_dir="/var/tmp/moe7-offload", batch_size=8, num_batches=1,
                     percent=[0, 100, 100, 0, 100, 0])  # fmt: skip
dec, pre = [], []
for _ in range(int(sys.argv[1])):
    llm.generate(ids.tolist(), max_new_tokens=16, ignore_eos=True)
    dec.append(round(llm.last_stats.decode_s, 3))
    pre.append(round(llm.last_stats.prefill_s, 3))
print(
    json.dumps(dict(tag=os.environ.get("TAG"), batch=8, new_tokens=16, decode_s=dec, prefill_s=pre))
)

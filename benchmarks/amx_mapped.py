"""The AMX kernel's rate on weights mapped from the checkpoint (page cache, 4 KB pages) against
the same weights copied into anonymous memory, on layer 0's o_proj and gate_proj of the
Llama-3.2-1B-shaped bf16 checkpoint, at 32 and 1024 rows (GFLOP/s, two alternations).

  flock /tmp/layercake-bench.lock python benchmarks/amx_mapped.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def rate(x, w, reps: int = 10) -> float:  # noqa: ANN001
    from layercake.ops import kernels

    kernels.bf16x3_mm(x, w)
    t = time.perf_counter()
    for _ in range(reps):
        kernels.bf16x3_mm(x, w)
    return 2 * x.shape[0] * w.shape[0] * w.shape[1] * reps / (time.perf_counter() - t) / 1e9


def main() -> None:
    import torch
    from generation import model_path

    from layercake.checkpoint import open_checkpoint

    torch.set_num_threads(2)
    ckpt = open_checkpoint(model_path("llama1b"))
    for name in ("model.layers.0.mlp.gate_proj.weight", "model.layers.0.self_attn.o_proj.weight"):
        w = ckpt.load(name, torch.bfloat16)  # a view of the map
        anon = w.clone()
        for M in (32, 1024):
            x = torch.randn(M, w.shape[1])
            r = [f"{rate(x, v):.0f}" for v in (w, anon, w, anon)]
            print(name, M, "mapped", r[0], "anon", r[1], "mapped", r[2], "anon", r[3], flush=True)


if __name__ == "__main__":
    main()

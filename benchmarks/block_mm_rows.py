"""``block_mm`` alone at 1..8 rows of activations on the embedded model's shapes (SmolLM2-135M
Q4_1: 30 layers of q|k|v 960x576, o 576x576, gate|up 3072x576, down 576x1536 in 4-bit blocks,
and the 49152x576 8-bit output head), a distinct weight per layer so that a step's weights
come from RAM as in a model; one JSON line per run (ms for one step's matmuls, and each shape's
in the order of SHAPES: ``shape_ms``), then medians.

  flock /tmp/layercake-bench.lock python benchmarks/block_mm_rows.py --repeats 3 --label new
  LAYERCAKE_NO_AVX512=1 ... --label avx2-vnni    LAYERCAKE_NO_VNNI=1 ... --label avx2

The instruction-set paths give the same bits (tests/test_kernels_rows.py); ``--label`` only
names the run (e.g. the build of another worktree on PYTHONPATH, or the environment above).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

SHAPES = [(4, 960, 576, 30), (4, 576, 576, 30), (4, 3072, 576, 30), (4, 576, 1536, 30),
          (8, 49152, 576, 1)]  # (bits, N, K, layers)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--label", default="")
    a = ap.parse_args()
    import torch

    from layercake.ops import kernels

    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    weights = []
    for bits, N, K, layers in SHAPES:
        G = K // 32
        w = torch.randint(0, 256, (layers, N, G * (20 if bits == 4 else 36)), dtype=torch.uint8,
                          generator=g)  # fmt: skip
        half = torch.tensor([0x00, 0x2C], dtype=torch.uint8)  # fp16 0.0625: finite scales
        w[:, :, : 4 * G] = half.repeat(layers, N, 2 * G)
        weights.append((bits, K, w))
    env = {k: v for k, v in os.environ.items() if k in ("LAYERCAKE_NO_AVX512", "LAYERCAKE_NO_VNNI")}
    runs: dict[int, list[float]] = {m: [] for m in a.rows}
    for rep in range(a.repeats + 1):  # the first pass warms up
        for M in a.rows:
            shape_ms = []
            t0 = time.perf_counter()
            for bits, K, w in weights:
                x = torch.randn(M, K, generator=g)
                t1 = time.perf_counter()
                for i in range(w.shape[0]):
                    kernels.block_mm(x, w[i], bits)
                shape_ms.append(round(1e3 * (time.perf_counter() - t1), 3))
            ms = 1e3 * (time.perf_counter() - t0)
            if rep:
                runs[M].append(ms)
                print(json.dumps(dict(bench="block_mm_rows", line="run", label=a.label, env=env,
                                      rows=M, step_ms=round(ms, 3), shape_ms=shape_ms)),
                      flush=True)  # fmt: skip
    for M, ms in runs.items():
        med = statistics.median(ms)
        print(json.dumps(dict(bench="block_mm_rows", line="median", label=a.label, env=env,
                              rows=M, step_ms=round(med, 3), runs=[round(v, 3) for v in ms],
                              per_row_ms=round(med / M, 3))), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

"""This machine's limits, measured independently of any run they judge, once, and cached.

The disk read rate (direct reads with the loader's reader and concurrency) and the peak matmul
come from the planner's measurement (``offload.measure``, cached in the same file); added here:
the RAM read bandwidth, and the matmul throughput per row count (a one-row product reads its
weights once for 2 FLOPs each, a 1024-row one is compute-bound: a decode step and a prefill are
judged against the rate their own shape can reach).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from layercake.offload import measure

ROWS = (1, 4, 16, 64, 256, 1024)  # activation rows of the measured products
K, N = 2048, 8192  # the product's weight: (N x K), a 1B model's MLP matrix
RAM_BYTES = 256 * 2**20  # read whole, several times: far larger than the caches


@dataclass(frozen=True)
class Limits:
    """Rates of this machine: GB/s and GFLOP/s (``matmul_gflops[rows]``)."""

    key: str
    ram_gbps: float
    disk_gbps: float  # 0: not measured (nothing streams from disk)
    matmul_gflops: dict[int, float] = field(default_factory=dict)
    measured_at: str = ""

    def matmul_peak(self, rows: int) -> float:
        """GFLOP/s a product with ``rows`` activation rows can reach: the best measured at
        this many rows or fewer (more rows can always run as several products of fewer), so a
        shape is never judged against one it cannot take the form of."""
        below = [v for r, v in self.matmul_gflops.items() if r <= rows]
        return max(below or [self.matmul_gflops[min(self.matmul_gflops)]])

    def to_json(self) -> dict:
        return asdict(self)


def ram_gbps(nbytes: int = RAM_BYTES, repeats: int = 5) -> float:
    """Read bandwidth of host RAM (GB/s): a sum over a buffer far larger than the caches, with
    torch's threads, the fastest of ``repeats`` passes."""
    x = torch.ones(nbytes // 4)
    x.sum()  # fault the pages in
    return nbytes / measure.best_of(lambda: x.sum(), repeats) / 1e9


def matmul_gflops_per_rows(rows: tuple[int, ...] = ROWS, repeats: int = 5) -> dict[int, float]:
    """GFLOP/s of ``(rows x K) @ (K x N)`` for each row count: the best of the forms the
    runners multiply with: PyTorch's fp32 GEMM, MKL's packed GEMM (in-memory fp32 weights) and
    the bf16-weight kernels (``kernels.bf16_linear``: AMX tiles where present, else ``bf16_mm``;
    bf16 weights), where available."""
    from layercake.ops import kernels, mkl

    w = torch.randn(N, K)
    forms = [lambda x: torch.nn.functional.linear(x, w)]
    if mkl.packing_available():
        forms.append(mkl.MKLPacked(w).linear)
    if kernels.available():
        wb = w.bfloat16()
        forms.append(lambda x: kernels.bf16_linear(x, wb))
    out = {}
    for r in rows:
        x = torch.randn(r, K)
        n = max(1, 8 // max(1, r // 128))  # several products per timing at few rows
        flops = 2 * r * K * N * n
        best = 0.0
        for f in forms:

            def step(f=f, x=x, n=n) -> None:
                for _ in range(n):
                    f(x)

            best = max(best, flops / measure.best_of(step, repeats) / 1e9)
        out[r] = round(best, 1)
    return out


def machine_limits(offload_dir: Path | None = None, remeasure: bool = False) -> Limits:
    """The limits, from the cache (``~/.cache/layercake/machine.json``, shared with the
    planner) unless ``remeasure`` or never measured with these threads on this file system."""
    threads = torch.get_num_threads()
    m = measure.measure_machine(offload_dir, remeasure=remeasure)  # disk (and peak), cached
    key = "bench|" + measure.machine_key("cpu", threads, None)
    data = measure.load_cache()
    hit = data.get("bench", {}).get(key)
    if hit is None or remeasure:
        print(f"layercake: measuring this machine's limits (once; cached in {measure.cache_dir()})",
              file=sys.stderr)  # fmt: skip
        hit = dict(
            ram_gbps=round(ram_gbps(), 2),
            matmul_gflops=matmul_gflops_per_rows(),
            measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        data.setdefault("bench", {})[key] = hit
        measure.save_cache(data)
    peaks = {int(r): v for r, v in hit["matmul_gflops"].items()}  # JSON keys are strings
    return Limits(key=key, ram_gbps=hit["ram_gbps"], disk_gbps=m.disk_gbps,
                  matmul_gflops=peaks, measured_at=hit["measured_at"])  # fmt: skip

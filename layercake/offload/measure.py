"""The machine's rates, measured once and cached: disk reads, matmul throughput, host->device.

``layercake plan`` and ``load(policy="auto")`` read them from ``~/.cache/layercake/machine.json``
(``LAYERCAKE_CACHE`` moves it), keyed by host, device, torch threads and the offload dir's file
system, so a second plan costs nothing; ``remeasure`` redoes them. The offload benchmark uses the
same functions for its bound, so the planner and the benchmark share one measurement.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from layercake.offload.tiers import ALIGN, DirectReader, align_up, host_buffer
from layercake.progress import waiting

PROBE_BYTES = 512 * 2**20  # written once to the offload dir and read back with direct I/O
CHUNK_BYTES = 128 * 2**20  # about one streamed unit of a 1B-3B model per read
FORMAT = 2


def cache_dir() -> Path:
    return Path(os.environ.get("LAYERCAKE_CACHE", Path.home() / ".cache/layercake"))


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` calls (seconds): the machine's rate, not a busy moment's."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def drop_page_cache() -> None:
    """Write dirty pages out and empty the page cache (root): the next reads are cold."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("1")


def direct_read_gbps(files: list[Path], passes: int = 2, drop_caches: bool = False) -> float:
    """GB/s reading ``files`` whole with the executor's direct reader and number of concurrent
    reads (the rate the loader gets); the faster of ``passes`` passes. ``drop_caches`` (root)
    also empties the page cache first, for files read through it where O_DIRECT is refused."""
    from layercake.offload.loader import READ_STREAMS

    buf = host_buffer(min(max(f.stat().st_size for f in files), CHUNK_BYTES) + ALIGN)
    best = 0.0
    for _ in range(passes):
        if drop_caches:
            drop_page_cache()
        t0, n = time.perf_counter(), 0
        for f in files:
            r = DirectReader(f)
            size = f.stat().st_size
            for off in range(0, size, CHUNK_BYTES):
                length = min(CHUNK_BYTES, size - off)
                n += r.read_into(buf, off, align_up(length) if r.direct else length, READ_STREAMS)
            r.close()
        best = max(best, n / (time.perf_counter() - t0))
    return best / 1e9


def disk_gbps(directory: Path, nbytes: int | None = None) -> float:
    """Direct-read GB/s of the file system holding ``directory`` (a probe file written, fsynced,
    dropped from the page cache, read twice, removed)."""
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / ".layercake-measure.bin"
    try:
        chunk = torch.randint(0, 256, (CHUNK_BYTES,), dtype=torch.uint8).numpy().tobytes()
        with open(probe, "wb") as f:
            for _ in range(max(1, (nbytes or PROBE_BYTES) // CHUNK_BYTES)):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        return direct_read_gbps([probe])
    finally:
        probe.unlink(missing_ok=True)


def matmul_gflops(threads: int | None = None, device: str = "cpu") -> float:
    """Peak matmul GFLOP/s of a (1024 x 2048) @ (2048 x 8192) product: fp32 (bf16 on CUDA); on
    the CPU the better of PyTorch's fp32 GEMM and our bf16-weight kernels (``kernels.bf16_linear``:
    AMX tiles where the CPU has them, else ``bf16_mm``; what bf16 weights run on)."""
    if threads:
        torch.set_num_threads(threads)
    dt = torch.float32 if device == "cpu" else torch.bfloat16
    x = torch.randn(1024, 2048, device=device, dtype=dt)
    w = torch.randn(8192, 2048, device=device, dtype=dt)

    def step() -> None:
        torch.nn.functional.linear(x, w)
        if device != "cpu":
            torch.cuda.synchronize()

    flops = 2 * 1024 * 2048 * 8192
    best = flops / best_of(step, 8) / 1e9
    if device == "cpu":
        from layercake.ops import kernels

        if kernels.available():
            wb = w.bfloat16()
            best = max(best, flops / best_of(lambda: kernels.bf16_linear(x, wb), 8) / 1e9)
    return best


def h2d_gbps(device: str = "cuda") -> float | None:
    """Pinned host -> device copy GB/s (None without CUDA)."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    src = torch.empty(256 * 2**20, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty_like(src, device=device)

    def step() -> None:
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()

    return src.numel() / best_of(step, 5) / 1e9


@dataclass(frozen=True)
class Machine:
    """Rates of this machine (GB/s, GFLOP/s) and where they were measured."""

    key: str
    disk_gbps: float
    matmul_gflops: float
    h2d_gbps: float | None = None
    measured_at: str = ""


def machine_key(device: str, threads: int, offload_dir: Path | None) -> str:
    fs = os.stat(offload_dir).st_dev if offload_dir is not None and offload_dir.exists() else 0
    return f"{socket.gethostname()}|{device}|threads={threads}|fs={fs}"


def load_cache() -> dict:
    path = cache_dir() / "machine.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"format": FORMAT}
    return data if data.get("format") == FORMAT else {"format": FORMAT}


def save_cache(data: dict) -> None:
    path = cache_dir() / "machine.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def measure_machine(
    offload_dir: Path | None, device: str = "cpu", remeasure: bool = False
) -> Machine:
    """This machine's rates, from the cache unless ``remeasure`` or never measured here. Without
    an offload dir nothing streams from disk and its rate is not needed (0)."""
    threads = torch.get_num_threads()
    if offload_dir is not None:
        offload_dir.mkdir(parents=True, exist_ok=True)
    key = machine_key(device, threads, offload_dir)
    data = load_cache()
    hit = data.get("machines", {}).get(key)
    if hit is not None and not remeasure:
        return Machine(**hit)
    with waiting("measuring this machine's disk and matmul rates (once; cached)"):
        m = Machine(
            key=key,
            disk_gbps=round(disk_gbps(offload_dir), 3) if offload_dir is not None else 0.0,
            matmul_gflops=round(matmul_gflops(device=device), 1),
            h2d_gbps=h2d_gbps(device),
            measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
    data.setdefault("machines", {})[key] = asdict(m)
    save_cache(data)
    return m

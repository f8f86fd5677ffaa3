"""Memory and disk tiers: page-aligned (or pinned) host buffers, direct reads from disk, and
tensors backed by files for a KV cache or activations placed on disk."""

from __future__ import annotations

import ctypes
import functools
import math
import mmap
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from layercake.errors import LayercakeError

ALIGN = 4096  # O_DIRECT wants the offset, length and buffer address aligned to the sector size
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


_MIN_CHUNK = 4 << 20  # smaller reads gain nothing from running side by side


class _Unaligned(Exception):
    pass


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(8, thread_name_prefix="layercake-read")


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def host_buffer(nbytes: int, pin: bool = False, private: bool = False) -> torch.Tensor:
    """A page-aligned uint8 host buffer (page-locked when ``pin``, for async copies to CUDA); an
    anonymous mapping of its own otherwise, given back to the OS on free: shared memory, or
    private (anonymous) memory when ``private``."""
    nbytes = align_up(max(nbytes, 1))
    if pin:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE if private else mmap.MAP_SHARED)
    return torch.frombuffer(mm, dtype=torch.uint8)


def mapped_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized CPU tensor in a private anonymous mapping of its own, unmapped when the
    tensor is freed. For the large tensors made anew every step (a pipeline's output logits,
    received frames): from glibc's heap (below its 32 MB mapping threshold) each left a hole
    that the small allocations made meanwhile split, so the next one grew the heap instead, by
    a varying number of such holes from run to run (rank 0 of a pipeline: 3 holes of 33 MB,
    OOM-killed at its cap in 3 of 11 runs)."""
    n = math.prod(shape) * dtype.itemsize
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    return host_buffer(n, private=True)[:n].view(dtype).view(shape)


class DirectReader:
    """Reads byte ranges of one file into aligned buffers, bypassing the page cache (O_DIRECT)
    where the file system allows it: streamed weights would otherwise fill the page cache, which
    a memory cap counts, and push out what should stay."""

    def __init__(self, path: str | os.PathLike, direct: bool = True) -> None:
        self.path = Path(path)
        self.direct = False
        flags = os.O_RDONLY
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.fd = os.open(self.path, flags | os.O_DIRECT)
                self.direct = True
                return
            except OSError:  # tmpfs and some others refuse O_DIRECT
                pass
        self.fd = os.open(self.path, flags)

    def read_into(self, buf: torch.Tensor, offset: int, length: int, streams: int = 1) -> int:
        """Read ``length`` bytes at file ``offset`` into the start of ``buf`` (aligned ranges when
        direct); returns the bytes read. ``streams`` > 1 splits the range into that many
        concurrent reads (an SSD serves a deeper queue faster). Releases the
        GIL while the disk works."""
        view = memoryview(buf.numpy())[:length]
        try:
            return self._read(view, offset, length, streams)
        except _Unaligned:  # O_DIRECT refused these ranges after all: read through the cache
            os.close(self.fd)
            self.fd, self.direct = os.open(self.path, os.O_RDONLY), False
            return self._read(view, offset, length, 1)

    def _read(self, view: memoryview, offset: int, length: int, streams: int) -> int:
        step = align_up(-(-length // max(1, streams)))
        if streams <= 1 or step < _MIN_CHUNK:
            return self._read_range(view, offset, 0, length)
        cuts = list(range(0, length, step)) + [length]
        futures = [_pool().submit(self._read_range, view, offset, a, b)
                   for a, b in zip(cuts[1:-1], cuts[2:])]  # fmt: skip
        parts = [lambda: self._read_range(view, offset, 0, cuts[1])] + [f.result for f in futures]
        done, error = 0, None
        for part in parts:  # every read finishes before any error leaves (and the fd is reused)
            try:
                done += part()
            except Exception as e:
                error = error or e
        if error is not None:
            raise error
        return done

    def _read_range(self, view: memoryview, offset: int, start: int, end: int) -> int:
        done = start
        while done < end:
            try:
                n = os.preadv(self.fd, [view[done:end]], offset + done)
            except OSError as e:
                if self.direct and e.errno == 22 and done == start:  # EINVAL: unaligned
                    raise _Unaligned from e
                raise LayercakeError(f"reading {self.path}: {e.strerror}") from e
            if n == 0:
                raise LayercakeError(
                    f"{self.path} ends at {offset + done} bytes, expected {offset + end}: "
                    "the offload file is truncated; delete it to have it written again"
                )
            done += n
        return end - start

    def close(self) -> None:
        os.close(self.fd)


def file_tensor(path: Path, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero-filled tensor whose memory is a shared mapping of ``path`` (a disk tier): the kernel
    writes it back and reclaims it under memory pressure, so it costs disk, not RAM."""
    numel = 1
    for s in shape:
        numel *= s
    nbytes = numel * dtype.itemsize
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(nbytes)  # sparse: no disk used until written
    t = torch.from_file(str(path), shared=True, size=numel, dtype=dtype)
    return t.view(shape)


_LOCKED: set[tuple[int, int]] = set()  # (start, end) of the views ``keep_in_ram`` locked


def _pages(t: torch.Tensor) -> tuple[int, int]:
    """The address of the page ``t``'s bytes start in, and the address just past them."""
    return t.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE, t.data_ptr() + t.nbytes


def keep_in_ram(t: torch.Tensor) -> torch.Tensor:
    """``t`` held in RAM until ``let_go``. A view of a file's map is locked there (``mlock``):
    under a memory cap the kernel would otherwise drop those clean pages first and fault them
    back in on every step. Where locking is not allowed (``RLIMIT_MEMLOCK``), a private copy."""
    if _libc is not None and t.numel():
        start, end = _pages(t)
        if _libc.mlock(ctypes.c_void_p(start), ctypes.c_size_t(end - start)) == 0:
            _LOCKED.add((t.data_ptr(), end))
            return t
    return t.clone()


def let_go(t: torch.Tensor | None) -> None:
    """Undo ``keep_in_ram`` for a view it locked (a no-op on any other tensor, owned memory
    included): unlocked, and its whole pages dropped from this process (``MADV_DONTNEED``; read
    from the file again if touched). A checkpoint's map is private and writable (copy-on-write),
    so locking it made private copies of its pages, which unlocking alone keeps for good: at
    B=64 an OLMoE run's moves of hot experts into RAM left 0.28 GB of the moved-out experts'
    down projections resident, on top of the ones moved in (README, MoE offload, moe10). The
    pages it shares with a neighbouring tensor (its first and last, partly) stay."""
    if t is None or _libc is None or not t.numel():
        return
    start, end = _pages(t)
    lo = t.data_ptr()
    if (lo, end) not in _LOCKED:
        return
    _LOCKED.discard((lo, end))
    _libc.munlock(ctypes.c_void_p(start), ctypes.c_size_t(end - start))
    inner, stop = align_up(lo, mmap.PAGESIZE), end // mmap.PAGESIZE * mmap.PAGESIZE
    if stop > inner:
        _libc.madvise(ctypes.c_void_p(inner), ctypes.c_size_t(stop - inner), 4)  # DONTNEED


def trim_heap() -> None:
    """Give the free pages of glibc's heap back to the system (``malloc_trim``): a freed block
    amid the heap is otherwise kept (the rows of an expert moved to disk, allocated at load; a
    prompt's pass's buffers), and the process's resident bytes measured next are what it holds."""
    if _libc is not None and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)


def advise_willneed(t: torch.Tensor) -> None:
    """Ask the kernel to start reading a file-backed tensor's pages in the background."""
    if _libc is None or t.numel() == 0:
        return
    start, end = _pages(t)
    _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 3)  # MADV_WILLNEED


def advise_rows(t: torch.Tensor, rows: torch.Tensor) -> None:
    """Ask the kernel to start reading the pages of rows ``rows`` of a 2-D file-backed tensor,
    all at once: the lookups after them then wait for one batch of concurrent reads, not for a
    page fault per row in turn (each queued behind the other reads of a throttled disk)."""
    if _libc is None or t.dim() != 2 or not t.is_contiguous() or not len(rows):
        return
    for r in sorted(set(rows.tolist())):
        advise_willneed(t[r])


def check_writable(directory: Path, need: int) -> None:
    """Clear errors before any work: the offload dir must be writable and have room."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".layercake-write-test"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        raise LayercakeError(f"offload dir {directory} is not writable: {e.strerror}") from e
    free = os_free_bytes(directory)
    if free < need:
        raise LayercakeError(
            f"offload dir {directory} has {free / 1e9:.2f} GB free, the offloaded weights need "
            f"{need / 1e9:.2f} GB"
        )


def os_free_bytes(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize

"""Memory and disk tiers: page-aligned (or pinned) host buffers, direct reads from disk, and
tensors backed by files for a KV cache or activations placed on disk."""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from pathlib import Path

import torch

from layercake.errors import LayercakeError

ALIGN = 4096  # O_DIRECT wants the offset, length and buffer address aligned to the block size
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def host_buffer(nbytes: int, pin: bool = False) -> torch.Tensor:
    """A page-aligned uint8 host buffer (page-locked when ``pin``, for async copies to CUDA)."""
    nbytes = align_up(max(nbytes, 1))
    if pin:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    mm = mmap.mmap(-1, nbytes)  # anonymous mapping: page-aligned, given back to the OS on free
    return torch.frombuffer(mm, dtype=torch.uint8)


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

    def read_into(self, buf: torch.Tensor, offset: int, length: int) -> int:
        """Read ``length`` bytes at file ``offset`` into the start of ``buf`` (aligned ranges when
        direct); returns the bytes read. Releases the GIL while the disk works."""
        view = memoryview(buf.numpy())[:length]
        done = 0
        while done < length:
            try:
                n = os.preadv(self.fd, [view[done:]], offset + done)
            except OSError as e:
                if self.direct and e.errno == 22 and done == 0:  # EINVAL: unaligned after all
                    os.close(self.fd)
                    self.fd, self.direct = os.open(self.path, os.O_RDONLY), False
                    continue
                raise LayercakeError(f"reading {self.path}: {e.strerror}") from e
            if n == 0:
                raise LayercakeError(
                    f"{self.path} ends at {offset + done} bytes, expected {offset + length}: "
                    "the offload file is truncated; delete it to have it written again"
                )
            done += n
        return done

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


def advise_willneed(t: torch.Tensor) -> None:
    """Ask the kernel to start reading a file-backed tensor's pages in the background."""
    if _libc is None or t.numel() == 0:
        return
    start = t.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
    end = t.data_ptr() + t.numel() * t.element_size()
    _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 3)  # MADV_WILLNEED


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

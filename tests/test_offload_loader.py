"""Reads in the background: the offload loader's thread at interpreter exit (a read still in
progress, as a pass reads the next pass's first units ahead, is finished and the thread joined,
not left inside a native call while the interpreter finalizes, which aborted a benchmark's
process with exit 134); a table's rows asked for all at once (``advise_rows``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from layercake.offload.loader import Loader

SCRIPT = """
import time, torch
from layercake.offload.loader import Loader
torch.set_num_threads(1)

class Slow:  # a read that spends its time in torch calls that release the GIL
    def read_into(self, buf, offset, length, streams=1):
        a = torch.randn(1000, 1000)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 1.5:
            a = torch.mm(a, a).clamp_(-1, 1)
        return length

loader = Loader({0: Slow()}, {0: (0, 16)}, [torch.empty(16, dtype=torch.uint8)])
loader.submit(0)
time.sleep(0.3)
"""


def test_exit_during_a_read_is_clean():
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                       timeout=60, env={"PYTHONPATH": str(root)})  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]


def test_close_drops_queued_reads_and_fails_their_waits():
    class Reader:
        def read_into(self, buf, offset, length, streams=1):
            buf[:length] = 7
            return length

    slots = [torch.zeros(4, dtype=torch.uint8)]
    loader = Loader({0: Reader(), 1: Reader()}, {0: (0, 4), 1: (0, 4)}, slots)
    assert loader.wait(0).tolist() == [7] * 4  # holds the only slot: unit 1 waits for it
    loader.submit(1)
    loader.close()
    assert not loader.thread.is_alive()
    try:
        loader.wait(1)
    except RuntimeError as e:
        assert "closed" in str(e)
    else:
        raise AssertionError("a wait on a closed loader returned")


def test_advise_rows_reads_just_those_rows(tmp_path):
    """The pages of the rows asked for are read (in the page cache afterwards), the others not."""
    import ctypes
    import mmap
    import os
    import time

    from layercake.offload.tiers import advise_rows

    page, n = mmap.PAGESIZE, 64
    path = tmp_path / "table.bin"
    path.write_bytes(os.urandom(page * n))
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # this file's pages leave the cache
    table = torch.from_file(str(path), size=page * n, dtype=torch.uint8).view(n, page)
    libc = ctypes.CDLL(None, use_errno=True)

    def cached() -> list[int]:
        vec = (ctypes.c_ubyte * n)()
        start = table.data_ptr()
        assert libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(page * n), vec) == 0
        return [i for i in range(n) if vec[i] & 1]

    if cached():  # the file system keeps it cached regardless (tmpfs): nothing to see
        os.close(fd)
        return
    advise_rows(table, torch.tensor([40, 3, 40]))
    deadline = time.monotonic() + 5
    while cached() != [3, 40] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cached() == [3, 40]
    os.close(fd)

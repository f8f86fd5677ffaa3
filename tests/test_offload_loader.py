"""The offload loader's thread at interpreter exit: a read still in progress (a pass reads the
next pass's first units ahead) is finished and the thread joined, not left inside a native call
while the interpreter finalizes, which aborted a benchmark's process (exit 134)."""

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

"""Where a process's anonymous memory goes over a run, sampled from inside it (a benchmark's
``--mem-trace``): every ``period`` s the anonymous total (``/proc/self/smaps_rollup``) and glibc's
heap figures (``mallinfo2``: bytes its arenas hold, in use and free, and in mappings of their
own); at each ``mark`` (a pass's end) and at every new peak, the anonymous bytes by mapping
(the main heap, thread arenas, other anonymous mappings by size). Diagnostic only: the samples
take a little of the process's core."""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                 "usmblks", "fsmblks", "uordblks", "fordblks",
                                                 "keepcost")]  # fmt: skip


def _mallinfo() -> dict[str, float]:
    try:
        f = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return {}
    f.restype = _MallInfo2
    m = f()
    return {"heap_mb": m.arena / 1e6, "heap_used_mb": m.uordblks / 1e6,
            "heap_free_mb": m.fordblks / 1e6, "mapped_mb": m.hblkhd / 1e6,
            "mapped_n": m.hblks}  # fmt: skip


def anonymous_mb() -> float:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) / 1e3
    return 0.0


def by_mapping() -> dict[str, float]:
    """Anonymous MB by kind of mapping: ``[heap]`` (the main arena), 64 MB-aligned regions of
    at most 64 MB (thread arenas, as glibc maps them), other anonymous mappings of >= 1 MB
    (allocations mapped alone: tensors), the rest (stacks, small maps)."""
    out = {"main_heap": 0.0, "thread_arenas": 0.0, "big_maps": 0.0, "other": 0.0}
    kind = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            path = " ".join(head[5:])
            if path == "[heap]":
                kind = "main_heap"
            elif path and not path.startswith("[anon"):
                kind = "file"
            elif lo % (64 << 20) == 0 and hi - lo <= 64 << 20:
                kind = "thread_arenas"
            else:
                kind = "big_maps" if hi - lo >= 1 << 20 else "other"
        elif head[0] == "Anonymous:" and kind in out:
            out[kind] += int(head[1]) / 1e3
    return {k: round(v, 1) for k, v in out.items()}


class MemTrace:
    """A sampling thread; ``mark(label)`` records a snapshot, ``result()`` the marks and peak."""

    def __init__(self, period: float = 0.02) -> None:
        self.period, self.marks, self.peak = period, [], {"anon_mb": 0.0}
        self.full = self.peak  # the latest snapshot by mapping taken at a new peak
        self.since = 0.0  # the most anonymous MB sampled since the last mark
        self.lock, self.stopped = threading.Lock(), False
        self.t0 = time.perf_counter()
        threading.Thread(target=self._run, daemon=True, name="memtrace").start()

    def snapshot(self, label: str, full: bool = True) -> dict:
        snap = {"label": label, "t": round(time.perf_counter() - self.t0, 3),
                "anon_mb": round(anonymous_mb(), 1)}  # fmt: skip
        snap.update({k: round(v, 1) for k, v in _mallinfo().items()})
        if full:
            snap.update(by_mapping())
        return snap

    def mark(self, label: str) -> None:
        s = self.snapshot(label)
        with self.lock:
            s["max_anon_since_mb"] = round(max(self.since, s["anon_mb"]), 1)
            self.since = 0.0
            self.marks.append(s)
            self._peak(s)

    def after(self, fn: Callable, label: str) -> Callable:
        """``fn`` that marks ``label`` each time it returns."""

        def marked(*a: Any, **kw: Any) -> Any:
            out = fn(*a, **kw)
            self.mark(label)
            return out

        return marked

    def _peak(self, s: dict) -> None:
        if s["anon_mb"] > self.peak["anon_mb"]:
            self.peak = s

    def _run(self) -> None:
        while not self.stopped:
            s = self.snapshot("sample", full=False)
            with self.lock:
                if s["anon_mb"] > self.full["anon_mb"] + 4:  # a new peak: where it is
                    s = self.full = self.snapshot("peak")
                self._peak(s)
                self.since = max(self.since, s["anon_mb"])
            time.sleep(self.period)

    def result(self) -> dict:
        self.stopped = True
        with self.lock:
            return {"peak": self.peak, "peak_by_mapping": self.full, "marks": self.marks}

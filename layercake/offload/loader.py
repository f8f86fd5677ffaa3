"""Background reads of units' disk rows into a ring of staging buffers (one thread; each read
split into concurrent direct reads). At interpreter exit every loader stops and its thread is
joined: a daemon thread still reading (a pass reads the next pass's first units ahead) would
take the GIL back inside a native call during finalization, which aborts the process ("terminate
called without an active exception", exit 134)."""

from __future__ import annotations

import atexit
import queue
import threading
import time
import weakref
from typing import Any

import torch

from layercake.offload.tiers import DirectReader

READ_STREAMS = 4  # concurrent direct reads per unit (see DirectReader.read_into)
_STOP = -1  # queued by close(): the thread ends
_live: weakref.WeakSet[Loader] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for loader in list(_live):
        loader.close()


class Loader:
    """Background reads of units' disk rows into a ring of staging buffers."""

    def __init__(self, readers: dict[int, DirectReader], ranges: dict[int, tuple[int, int]],
                 slots: list[torch.Tensor]) -> None:  # fmt: skip
        self.readers, self.ranges = readers, ranges
        self.free_slots: queue.Queue[int] = queue.Queue()
        for i in range(len(slots)):
            self.free_slots.put(i)
        self.slots = slots
        self.todo: queue.Queue[int] = queue.Queue()
        self.inflight: dict[int, list[Any]] = {}  # unit -> [event, slot, error]
        self.bytes_read = 0
        self.read_s = 0.0  # time spent reading: bytes_read / read_s is the rate the disk gave
        self.closed = False
        self.thread = threading.Thread(target=self._run, daemon=True, name="layercake-loader")
        self.thread.start()
        _live.add(self)

    def close(self) -> None:
        """Stop reading (reads queued but not started are dropped; one in progress finishes)
        and join the thread. Waiting for a unit afterwards raises."""
        if self.closed:
            return
        self.closed = True
        self.todo.put(_STOP)
        self.free_slots.put(_STOP)  # wakes the thread if it waits for a slot
        self.thread.join()
        for item in self.inflight.values():
            if not item[0].is_set():
                item[2] = RuntimeError("the loader was closed")
                item[0].set()

    def submit(self, unit: int) -> None:
        if unit in self.inflight or unit not in self.ranges:
            return
        self.inflight[unit] = [threading.Event(), None, None]
        self.todo.put(unit)

    def wait(self, unit: int) -> torch.Tensor | None:
        if unit not in self.ranges:
            return None
        self.submit(unit)
        ev, slot, err = self.inflight[unit]
        ev.wait()
        ev, slot, err = self.inflight[unit]
        if err is not None:
            del self.inflight[unit]
            if slot is not None:
                self.free_slots.put(slot)
            raise err
        return self.slots[slot]

    def ready(self, unit: int) -> bool:
        """Whether ``wait(unit)`` would return at once (read, or not on disk)."""
        item = self.inflight.get(unit)
        return unit not in self.ranges or (item is not None and item[0].is_set())

    def free(self, unit: int) -> None:
        item = self.inflight.pop(unit, None)
        if item is not None and item[1] is not None:
            self.free_slots.put(item[1])

    def _run(self) -> None:
        while True:
            unit = self.todo.get()
            if self.closed:
                return
            slot = self.free_slots.get()
            if self.closed:
                return
            item = self.inflight[unit]
            item[1] = slot
            try:
                offset, length = self.ranges[unit]
                t0 = time.perf_counter()
                self.bytes_read += self.readers[unit].read_into(
                    self.slots[slot], offset, length, streams=READ_STREAMS
                )
                self.read_s += time.perf_counter() - t0
            except Exception as e:  # handed to the compute thread by wait()
                item[2] = e
            item[0].set()

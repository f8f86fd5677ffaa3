"""Range streaming: the weights of a node that holds several non-adjacent ranges (``h0: b 0-4
8-12``) stream through one pool of staging slots that all its ranges share, instead of each range
keeping its own budget. Once a range's pass ends, the node reads the next range's units into the
pool while the other nodes compute (``Stage.prefetch_after``); a unit read stays in its slot after
its compute until the slot is needed again, so the later pieces of a prompt, and the next step
when the pool holds more than one range, use it without a read.

Which kept unit gives its slot: the one needed furthest ahead in the node's cyclic order of units
(its ranges in path order, each range's units in execution order): for a pass that visits every
unit in that order each step, the choice that reads least (Belady's, the order being known).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

import torch

from layercake.offload.loader import READ_STREAMS

Key = tuple[int, int]  # (the range's position on this node, the unit within its runner)


class RangePool:
    """Background reads of several runners' disk units into one ring of shared slots."""

    def __init__(self, slots: list[torch.Tensor], sources: dict[Key, tuple[Any, int, int]]) -> None:
        """``sources``: (reader, offset, length) of every streamed unit, keyed by (range, unit)."""
        self.slots, self.sources = slots, sources
        self.order = {k: i for i, k in enumerate(sorted(sources))}  # the cyclic visit order
        self.cond = threading.Condition()
        self.free: list[int] = list(range(len(slots)))
        self.kept: dict[Key, int] = {}  # read, computed with and released: slot not yet reused
        self.inflight: dict[Key, list[Any]] = {}  # key -> [event, slot, error]
        self.todo: deque[Key] = deque()
        self.bytes_read: dict[int, int] = {}  # per range
        self.read_s: dict[int, float] = {}
        self.hits = 0  # units a submit found kept (no read)
        threading.Thread(target=self._run, daemon=True, name="layercake-range-pool").start()

    def view(self, index: int, ranges: dict[int, tuple[int, int]]) -> PoolView:
        """The loader of the range at position ``index`` (what its ``OffloadRunner`` calls)."""
        return PoolView(self, index, ranges)

    def submit(self, key: Key) -> None:
        with self.cond:
            if key in self.inflight:
                return
            if key in self.kept:  # still in its slot: no read
                ev = threading.Event()
                ev.set()
                self.inflight[key] = [ev, self.kept.pop(key), None]
                self.hits += 1
                return
            self.inflight[key] = [threading.Event(), None, None]
            self.todo.append(key)
            self.cond.notify_all()

    def wait(self, key: Key) -> torch.Tensor:
        self.submit(key)
        item = self.inflight[key]
        item[0].wait()
        if item[2] is not None:
            with self.cond:
                if self.inflight.get(key) is item:
                    del self.inflight[key]
                    self.free.append(item[1])
                self.cond.notify_all()
            raise item[2]
        return self.slots[item[1]]

    def release(self, key: Key) -> None:
        """The unit's computes are done: its slot is kept with its bytes until it is needed."""
        with self.cond:
            item = self.inflight.pop(key, None)
            # a unit still being read (a failed pass) has its slot freed by the reader
            if item is not None and item[1] is not None and item[0].is_set():
                if item[2] is None:
                    self.kept[key] = item[1]
                else:
                    self.free.append(item[1])
            self.cond.notify_all()

    def _slot_for(self, key: Key) -> int:
        """A free slot, else the kept unit's needed furthest after ``key`` (lock held)."""
        if self.free:
            return self.free.pop()
        n, at = len(self.order), self.order[key]
        victim = max(self.kept, key=lambda k: (self.order[k] - at) % n)
        return self.kept.pop(victim)

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.todo or not (self.free or self.kept):
                    self.cond.wait()
                key = self.todo.popleft()
                item = self.inflight.get(key)
                if item is None or item[1] is not None:  # released before its read, or queued
                    continue  # twice (released and submitted again)
                slot = item[1] = self._slot_for(key)
            reader, offset, length = self.sources[key]
            err = None
            try:
                t0 = time.perf_counter()
                n = reader.read_into(self.slots[slot], offset, length, streams=READ_STREAMS)
                with self.cond:
                    self.bytes_read[key[0]] = self.bytes_read.get(key[0], 0) + n
                    self.read_s[key[0]] = self.read_s.get(key[0], 0.0) + time.perf_counter() - t0
            except Exception as e:  # handed to the compute thread by wait()
                err = e
            with self.cond:
                if self.inflight.get(key) is not item:  # released meanwhile: the slot goes back
                    self.free.append(slot)
                else:
                    item[2] = err
                item[0].set()
                self.cond.notify_all()


class PoolView:
    """One range's loader on the shared pool: the interface ``OffloadRunner`` uses (``ranges``,
    ``slots``, ``submit``, ``wait``, ``free``, ``bytes_read``, ``read_s``)."""

    def __init__(self, pool: RangePool, index: int, ranges: dict[int, tuple[int, int]]) -> None:
        self.pool, self.index, self.ranges = pool, index, ranges
        self.slots = pool.slots

    def submit(self, unit: int) -> None:
        if unit in self.ranges:
            self.pool.submit((self.index, unit))

    def wait(self, unit: int) -> torch.Tensor | None:
        return self.pool.wait((self.index, unit)) if unit in self.ranges else None

    def free(self, unit: int) -> None:
        self.pool.release((self.index, unit))

    @property
    def bytes_read(self) -> int:
        return self.pool.bytes_read.get(self.index, 0)

    @property
    def read_s(self) -> float:
        return self.pool.read_s.get(self.index, 0.0)

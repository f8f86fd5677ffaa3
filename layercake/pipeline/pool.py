"""Range streaming: the weights of a node that holds several non-adjacent ranges (``h0: b 0-4
8-12``) stream through one pool of staging slots that all its ranges share, instead of each range
keeping its own budget. Once a range's pass ends, the node reads ahead the units it needs next
(the next range's, then the one after) while the other nodes compute (``Stage.prefetch_after``);
a unit read stays in its slot after its compute until the slot is needed again, so the later
pieces of a prompt, and the next step when the pool holds more than one range, use it without a
read.

Which units are in the slots follows Belady's rule, the order of use being known: the node's
ranges in path order, each range's units in execution order, a range's units again for each
further piece of a pass (``focus``). A read takes a free slot, or the slot of the kept (or read
ahead and not yet used) unit needed furthest from now, and only when that unit is needed later
than the one read: reading far ahead never pushes out what is needed sooner. Queued reads go
nearest first.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from layercake.offload.loader import READ_STREAMS

Key = tuple[int, int]  # (the range's position on this node, the unit within its runner)


@dataclass
class Item:
    """A submitted unit: queued (no slot), being read (slot, event not set) or read."""

    event: threading.Event = field(default_factory=threading.Event)
    slot: int | None = None
    error: Exception | None = None
    used: bool = False  # waited for by the compute: its slot is not taken back until released


class RangePool:
    """Background reads of several runners' disk units into one ring of shared slots."""

    def __init__(self, slots: list[torch.Tensor], sources: dict[Key, tuple[Any, int, int]]) -> None:
        """``sources``: (reader, offset, length) of every streamed unit, keyed by (range, unit)."""
        self.slots, self.sources = slots, sources
        self.keys = sorted(sources)  # the cyclic order of use
        self.order = {k: i for i, k in enumerate(self.keys)}
        self.size = Counter(k[0] for k in self.keys)
        self.cursor, self.more = self.keys[0], 0  # the unit used next; passes of its range left
        self.cond = threading.Condition()
        self.free: list[int] = list(range(len(slots)))
        self.kept: dict[Key, int] = {}  # read, computed with and released: slot not yet reused
        self.items: dict[Key, Item] = {}
        self.bytes_read: dict[int, int] = {}  # per range
        self.read_s: dict[int, float] = {}
        self.hits = 0  # units a submit found kept (no read)
        threading.Thread(target=self._run, daemon=True, name="layercake-range-pool").start()

    def view(self, index: int, ranges: dict[int, tuple[int, int]]) -> PoolView:
        """The loader of the range at position ``index`` (what its ``OffloadRunner`` calls)."""
        return PoolView(self, index, ranges)

    def distance(self, k: Key) -> int:
        """How many unit uses from now ``k`` is next needed (lock held)."""
        at, n, m = self.order[self.cursor], len(self.keys), self.size[self.cursor[0]]
        if self.more and k[0] == self.cursor[0]:  # its range runs again in this pass
            return (self.order[k] - at) % m
        return (self.order[k] - at) % n + self.more * m

    def focus(self, index: int, more: int) -> None:
        """Range ``index`` runs now, and ``more`` times again in this pass (a prompt's pieces)."""
        first = next((k for k in self.keys if k[0] == index), None)
        if first is not None:
            with self.cond:
                self.cursor, self.more = first, more
                self.cond.notify_all()

    def read_ahead(self, index: int) -> None:
        """Range ``index`` runs next: queue as many units as the pool holds, in order of use
        from its first (the reads go as far as Belady's rule lets them)."""
        self.focus(index, 0)
        if index in self.size:
            start = self.order[self.cursor]
            for i in range(min(len(self.slots), len(self.keys))):
                self.submit(self.keys[(start + i) % len(self.keys)])

    def submit(self, key: Key) -> None:
        with self.cond:
            if key in self.items:
                return
            if key in self.kept:  # still in its slot: no read
                item = self.items[key] = Item(slot=self.kept.pop(key))
                item.event.set()
                self.hits += 1
                return
            self.items[key] = Item()
            self.cond.notify_all()

    def wait(self, key: Key) -> torch.Tensor:
        with self.cond:  # (re-entrant: submit takes it too)
            self.cursor = key
            self.submit(key)
            item = self.items[key]
            item.used = True
            self.cond.notify_all()
        item.event.wait()
        if item.error is not None:
            with self.cond:
                if self.items.get(key) is item:
                    del self.items[key]
                    self.free.append(item.slot)
                self.cond.notify_all()
            raise item.error
        return self.slots[item.slot]

    def release(self, key: Key) -> None:
        """The unit's computes are done: its slot is kept with its bytes until it is needed."""
        with self.cond:
            item = self.items.pop(key, None)
            # a unit still being read (a failed pass) has its slot freed by the reader
            if item is not None and item.slot is not None and item.event.is_set():
                if item.error is None:
                    self.kept[key] = item.slot
                else:
                    self.free.append(item.slot)
            self.cond.notify_all()

    def _pick(self) -> tuple[Key, Item, int] | None:
        """The queued unit needed soonest and the slot it is read into, if any may be taken
        (lock held)."""
        queued = [k for k, it in self.items.items() if it.slot is None]
        if not queued:
            return None
        key = min(queued, key=self.distance)
        if self.free:
            return key, self.items[key], self.free.pop()
        # units read ahead and not used yet give their slot only to the unit the compute
        # waits for (a read taken back is a read lost)
        ahead = [k for k, it in self.items.items()
                 if it.event.is_set() and not it.used and it.error is None
                 and self.items[key].used]  # fmt: skip
        victim = max([*self.kept, *ahead], key=self.distance, default=None)
        if victim is None or self.distance(victim) <= self.distance(key):
            return None
        if victim in self.kept:
            return key, self.items[key], self.kept.pop(victim)
        it = self.items[victim]  # read ahead, not used yet: queued again
        slot, it.slot = it.slot, None
        it.event.clear()
        return key, self.items[key], slot

    def _run(self) -> None:
        while True:
            with self.cond:
                while (pick := self._pick()) is None:
                    self.cond.wait()
                key, item, slot = pick
                item.slot = slot
            reader, offset, length = self.sources[key]
            try:
                t0 = time.perf_counter()
                n = reader.read_into(self.slots[slot], offset, length, streams=READ_STREAMS)
                with self.cond:
                    self.bytes_read[key[0]] = self.bytes_read.get(key[0], 0) + n
                    self.read_s[key[0]] = self.read_s.get(key[0], 0.0) + time.perf_counter() - t0
            except Exception as e:  # handed to the compute thread by wait()
                item.error = e
            with self.cond:
                if self.items.get(key) is not item:  # released meanwhile: the slot goes back
                    self.free.append(slot)
                item.event.set()
                self.cond.notify_all()


class PoolView:
    """One range's loader on the shared pool: the interface ``OffloadRunner`` uses (``ranges``,
    ``slots``, ``submit``, ``wait``, ``free``, ``bytes_read``, ``read_s``)."""

    def __init__(self, pool: RangePool, index: int, ranges: dict[int, tuple[int, int]]) -> None:
        self.pool, self.index, self.ranges = pool, index, ranges
        self.slots = pool.slots

    last = -1  # the unit waited for last

    def submit(self, unit: int) -> None:
        """The executor's read-ahead; its loads that wrap to this range's next pass are left to
        the pool, which reads ahead in the node's order (``RangePool.read_ahead``)."""
        if unit in self.ranges and unit > self.last:
            self.pool.submit((self.index, unit))

    def wait(self, unit: int) -> torch.Tensor | None:
        self.last = unit
        return self.pool.wait((self.index, unit)) if unit in self.ranges else None

    def free(self, unit: int) -> None:
        self.pool.release((self.index, unit))

    @property
    def bytes_read(self) -> int:
        return self.pool.bytes_read.get(self.index, 0)

    @property
    def read_s(self) -> float:
        return self.pool.read_s.get(self.index, 0.0)

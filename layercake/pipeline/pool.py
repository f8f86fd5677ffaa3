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
nearest first. At demand only (``lead`` 0) that reads Belady's minimum; a node's pool queues
the next uses as far as its slots reach on every wait (``lead``), so a slot given up by a
unit needed later is refilled at once, while the other nodes compute.

Memory the whole slots leave (``prefix``) keeps the first bytes of the units used last in a
cycle: those are the reads the compute waits for at the end of a pass. A unit kept whole there
is computed from it and takes no slot; a unit kept in part copies its first bytes into its
slot and reads the rest. ``LAYERCAKE_POOL_TRACE=PATH`` writes every wait, read and release
with its time to PATH.PID (what the analysis of the waits in the README used).
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from layercake.offload.loader import READ_STREAMS
from layercake.offload.tiers import ALIGN

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

    def __init__(self, slots: list[torch.Tensor], sources: dict[Key, tuple[Any, int, int]],
                 lead: int = 0, prefix: torch.Tensor | None = None) -> None:  # fmt: skip
        """``sources``: (reader, offset, length) of every streamed unit, keyed by (range, unit).
        ``lead``: on each wait, queue the units of the next ``lead`` uses (0: read at demand
        only, which reads Belady's minimum). ``prefix``: memory beside the slots that keeps
        the first bytes of the cycle's last units (``prefixes``)."""
        self.slots, self.sources, self.lead = slots, sources, lead
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
        self.prefix = prefixes(self.keys, sources, prefix)
        trace = os.environ.get("LAYERCAKE_POOL_TRACE")
        self.trace = open(f"{trace}.{os.getpid()}", "w") if trace else None
        if self.trace is not None:
            self.trace.write(f"slots {len(slots)} {[(k, v[2]) for k, v in sources.items()]}\n")
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
        self.note("ahead", (index, -1))
        if index in self.size:
            start = self.order[self.cursor]
            for i in range(min(len(self.slots), len(self.keys))):
                self.submit(self.keys[(start + i) % len(self.keys)])

    def note(self, what: str, key: Key) -> None:
        if self.trace is not None:
            self.trace.write(f"{time.perf_counter():.4f} {what} {key[0]} {key[1]}\n")
            self.trace.flush()

    def submit(self, key: Key) -> None:
        with self.cond:
            if key in self.items or self.whole(key):
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
            for k in sorted(self.keys, key=self.distance)[1 : self.lead]:
                self.submit(k)  # as soon as a slot of a unit needed later frees, it is read
            if self.whole(key):  # computed from the prefix memory itself: no slot, no read
                return self.prefix[key][0]
            self.submit(key)
            item = self.items[key]
            item.used = True
            self.cond.notify_all()
        self.note("wait", key)
        item.event.wait()
        self.note("got", key)
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
        self.note("release", key)
        with self.cond:
            item = self.items.pop(key, None)
            # a unit still being read (a failed pass) has its slot freed by the reader
            if item is not None and item.slot is not None and item.event.is_set():
                if item.error is None and not self.whole(key):
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
                self.note("read", key)
                n = self._read(key, self.slots[slot], reader, offset, length)
                with self.cond:
                    self.bytes_read[key[0]] = self.bytes_read.get(key[0], 0) + n
                    self.read_s[key[0]] = self.read_s.get(key[0], 0.0) + time.perf_counter() - t0
                self.note("done", key)
            except Exception as e:  # handed to the compute thread by wait()
                item.error = e
            with self.cond:
                if self.items.get(key) is not item:  # released meanwhile: the slot goes back
                    self.free.append(slot)
                item.event.set()
                self.cond.notify_all()

    def whole(self, key: Key) -> bool:
        """Whether the unit's bytes are all in its kept prefix (a read is a copy)."""
        kept, filled = self.prefix.get(key, (None, False))
        return filled and len(kept) >= self.sources[key][2]

    def _read(self, key: Key, slot: torch.Tensor, reader: Any, offset: int, length: int) -> int:
        """The unit's bytes into its slot: a kept prefix copied, the rest from disk (the bytes
        read from disk; the first read of a unit with a prefix fills it)."""
        kept, filled = self.prefix.get(key, (None, True))
        if kept is None or not filled:
            n = reader.read_into(slot, offset, length, streams=READ_STREAMS)
            if kept is not None:
                kept.copy_(slot[: len(kept)])
                self.prefix[key] = (kept, True)
            return n
        p = len(kept)
        slot[:p].copy_(kept)
        if p >= length:
            return 0
        return reader.read_into(slot[p:], offset + p, length - p, streams=READ_STREAMS)


def prefixes(keys: list[Key], sources: dict[Key, tuple[Any, int, int]],
             buf: torch.Tensor | None) -> dict[Key, tuple[torch.Tensor, bool]]:  # fmt: skip
    """Split ``buf`` into the first bytes of the units used last in a cycle (the last range's
    last unit first): their reads come while the other ranges' are done and the compute
    waits for them, so those are the bytes worth not reading (a unit's share of ``buf``, whole
    pages, and whether it holds the unit's bytes yet)."""
    out: dict[Key, tuple[torch.Tensor, bool]] = {}
    at = 0
    for key in reversed(keys):
        left = 0 if buf is None else (len(buf) - at) // ALIGN * ALIGN
        p = min(left, sources[key][2] // ALIGN * ALIGN)
        if p <= 0:
            break
        out[key] = (buf[at : at + p], False)
        at += p
    return out


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

"""The CUDA side of the offload executor: copies between host and device run on a side stream,
ordered against the compute stream by events, so that they overlap the compute.

- Weights: each unit is materialized (host RAM / staging rows copied in, compressed rows
  dequantized) on the side stream into one of two device scratch buffers, while the previous
  unit computes from the other; the compute stream waits for the unit's event, and the side
  stream waits for the compute that last used a buffer before refilling it.
- KV cache of layers held in host RAM (pinned) or on disk (read into a pinned ring): a
  micro-batch's rows are copied to a small device ring ahead of their compute and back behind it
  (``DeviceKV``), or, with ``cpu_cache_compute`` (FlexGen's ``--cpu-cache-compute``), attention
  runs on the CPU where the cache is and only q, k, v and the result cross the bus.
"""

from __future__ import annotations

from typing import Any

import torch

RING = 3  # device buffers for micro-batches' KV: in compute, fetched ahead, written back behind


class WeightStream:
    """Double-buffered materialization of units' weights on a side stream."""

    def __init__(self, device: torch.device, scratch: torch.Tensor) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.bufs = [scratch, torch.empty_like(scratch)]
        self.done: list[Any] = [None, None]  # compute event after the last use of each buffer
        self.turn = 0
        self.used: dict[int, int] = {}  # unit -> buffer

    def begin(self, unit: int) -> torch.Tensor:
        """The scratch buffer unit ``unit`` is materialized into; call inside ``stream``."""
        b = self.turn
        self.turn ^= 1
        if self.done[b] is not None:  # the compute that read it last is over before it is refilled
            self.stream.wait_event(self.done[b])
        self.used[unit] = b
        return self.bufs[b]

    def ready(self) -> Any:
        """After the unit's copies are queued: the compute stream waits for them; the returned
        event also tells when the host buffers they read from may be reused."""
        ev = torch.cuda.Event()
        ev.record(self.stream)
        torch.cuda.current_stream(self.device).wait_event(ev)
        return ev

    def release(self, unit: int) -> None:
        """The unit's computes are queued: its buffer may be refilled once they complete."""
        b = self.used.pop(unit, None)
        if b is not None:
            self.done[b] = torch.cuda.Event()
            self.done[b].record(torch.cuda.current_stream(self.device))


class DeviceKV:
    """A ring of device buffers for micro-batches' keys and values held in host RAM: rows copied
    in on the side stream ahead of their compute, copied back behind it."""

    def __init__(self, device: torch.device, stream: Any) -> None:
        self.device, self.stream = device, stream
        self.bufs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.busy: list[object | None] = []
        self.turn = 0
        self.live: dict[object, tuple] = {}

    def _ring(self, like: torch.Tensor) -> None:
        if (
            self.bufs
            and self.bufs[0][0].shape[1:] == like.shape[1:]
            and (self.bufs[0][0].shape[0] >= like.shape[0] and self.bufs[0][0].dtype == like.dtype)
        ):
            return
        assert not self.live, "the ring grows only between forward passes"
        self.stream.synchronize()
        shape = like.shape
        self.bufs = [
            tuple(torch.empty(shape, dtype=like.dtype, device=self.device) for _ in "kv")
            for _ in range(RING)
        ]
        self.busy = [None] * RING

    def fetch(self, key: object, hk: torch.Tensor, hv: torch.Tensor) -> None:
        """Start copying rows ``hk``/``hv`` (contiguous host tensors, pinned for the copy to be
        asynchronous) to the device."""
        if key in self.live:
            return
        self._ring(hk)
        slot = self.turn
        self.turn = (self.turn + 1) % RING
        if self.busy[slot] is not None:
            raise RuntimeError(f"device KV ring overrun: {self.busy[slot]} still in use")
        n = hk.shape[0]
        dk, dv = (b[:n] for b in self.bufs[slot])
        with torch.cuda.stream(self.stream):
            dk.copy_(hk, non_blocking=True)
            dv.copy_(hv, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        self.busy[slot] = key
        self.live[key] = (slot, ev, hk, hv, dk, dv)

    def get(self, key: object) -> tuple[torch.Tensor, torch.Tensor]:
        _, ev, _, _, dk, dv = self.live[key]
        torch.cuda.current_stream(self.device).wait_event(ev)
        return dk, dv

    def store(self, key: object) -> None:
        """Copy the rows back (whole rows: one contiguous, asynchronous copy each) once the
        compute queued so far is done; the buffer is then reused in stream order."""
        slot, _, hk, hv, dk, dv = self.live.pop(key)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        self.stream.wait_event(done)
        with torch.cuda.stream(self.stream):
            hk.copy_(dk, non_blocking=True)
            hv.copy_(dv, non_blocking=True)
        self.busy[slot] = None

    def finish(self) -> None:
        """Every copy back is in host memory (before anyone on the host reads the cache)."""
        self.live.clear()
        self.busy = [None] * len(self.bufs)
        self.stream.synchronize()


def to_device_rows(ring: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A (rows, n_kv, capacity, hd) view of a host ring buffer (slot-major underneath) copied to
    the device in one contiguous copy, seen the same way."""
    raw = ring.permute(2, 0, 1, 3)  # (capacity, rows, n_kv, hd), contiguous
    return raw.to(device, non_blocking=True).permute(1, 2, 0, 3)


def to_host_rows(dev: torch.Tensor, ring: torch.Tensor) -> None:
    """The inverse of ``to_device_rows``, synchronous (the ring is written to disk next)."""
    ring.permute(2, 0, 1, 3).copy_(dev.permute(2, 0, 1, 3))

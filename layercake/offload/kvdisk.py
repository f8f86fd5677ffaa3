"""The KV cache of layers placed on disk, streamed with direct I/O instead of paged by the kernel.

A shared map of the cache files (what the first version did) lets the kernel page the cache in
and write it back; under a memory cap its dirty-page writeback stalls the compute thread for
seconds. Here each disk layer's keys and values are files laid out slot-major, (capacity, B,
n_kv, hd), so that

- a micro-batch's slots [0, s) are s runs of its rows, read ahead of its compute into a small
  ring of RAM buffers (O_DIRECT, concurrent reads: no page cache, no faults), and
- a step's new slots are one run per slot, written back behind the compute by a writer thread
  (a decode step writes one slot per micro-batch and layer, not the whole cache).

The tensor a ``KVCache`` holds for such a layer is still a shared map of the same file, seen as
(B, n_kv, capacity, hd): the engine's in-place operations between forward passes (``shift``,
``rows``, ``load_rows``) keep working on it unchanged. The kernel keeps the two views coherent: a
direct read first writes back the range's dirty mapped pages, a direct write drops them.
"""

from __future__ import annotations

import os
import queue
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from layercake.errors import LayercakeError
from layercake.offload.tiers import ALIGN, host_buffer

READERS = 4  # concurrent reads of one micro-batch's slots
RING = 3  # RAM buffers (keys and values of one micro-batch each): in compute, ahead, behind


@dataclass
class DiskKV:
    """Keys or values of one layer in a file, slot-major; ``tensor`` maps it as (B, n_kv,
    capacity, hd)."""

    path: Path
    shape: tuple[int, int, int, int]  # (B, n_kv, capacity, hd)
    dtype: torch.dtype
    tensor: torch.Tensor
    direct: int  # O_DIRECT descriptor (-1 where the file system refuses it)
    buffered: int

    @classmethod
    def create(cls, path: Path, shape: tuple[int, int, int, int], dtype: torch.dtype) -> DiskKV:
        B, n_kv, cap, hd = shape
        numel = B * n_kv * cap * hd
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(path, "wb") as f:
                f.truncate(numel * dtype.itemsize)  # sparse: zeros, no disk used until written
        except OSError as e:
            raise LayercakeError(f"KV cache file {path}: {e.strerror}") from e
        mapped = torch.from_file(str(path), shared=True, size=numel, dtype=dtype)
        tensor = mapped.view(cap, B, n_kv, hd).permute(1, 2, 0, 3)  # (B, n_kv, cap, hd)
        direct = -1
        if hasattr(os, "O_DIRECT"):
            try:
                direct = os.open(path, os.O_RDWR | os.O_DIRECT)
            except OSError:  # tmpfs and some others refuse O_DIRECT
                pass
        buffered = os.open(path, os.O_RDWR)
        path.unlink()  # the map and the descriptors keep it; nothing is left behind on exit
        return cls(path, shape, dtype, tensor, direct, buffered)

    @property
    def row_bytes(self) -> int:  # one row's keys (or values) of one slot
        return self.shape[1] * self.shape[3] * self.dtype.itemsize

    def rows_of(self, t: torch.Tensor) -> int | None:
        """The first row of ``t`` when it is a view of whole rows of this file's map."""
        base, ptr = self.tensor.data_ptr(), t.data_ptr()
        step = self.tensor.stride(0) * self.dtype.itemsize
        if (
            t.dtype != self.dtype
            or t.shape[1:] != self.tensor.shape[1:]
            or t.stride() != self.tensor.stride()
            or not 0 <= ptr - base < self.shape[0] * step
            or (ptr - base) % step
        ):
            return None
        return (ptr - base) // step

    def transfer(self, buf: torch.Tensor, row0: int, rows: int, start: int, end: int,
                 write: bool, pool: ThreadPoolExecutor | None = None) -> None:  # fmt: skip
        """Slots [start, end) of rows [row0, row0 + rows) between the file and ``buf``, a
        (capacity, rows, n_kv, hd) buffer of the same layout. Direct I/O when every range is
        aligned; runs of slots in ``pool``'s threads side by side."""
        if end <= start:
            return
        rb, B = self.row_bytes, self.shape[0]
        run = rows * rb  # one slot of these rows: contiguous in the file and in buf
        view = memoryview(buf.view(torch.uint8).numpy()).cast("B")
        aligned = not (row0 * rb % ALIGN or B * rb % ALIGN or run % ALIGN or buf.data_ptr() % ALIGN)
        fd = self.direct if aligned and self.direct >= 0 else self.buffered
        if rows == B:  # the slots are one contiguous range of the file
            spans = [(start, end)]
        else:
            spans = [(s, s + 1) for s in range(start, end)]

        def one(s0: int, s1: int) -> None:
            mem = view[s0 * run : s1 * run]
            off = (s0 * B + row0) * rb
            done = 0
            while done < len(mem):
                try:
                    if write:
                        n = os.pwritev(fd, [mem[done:]], off + done)
                    else:
                        n = os.preadv(fd, [mem[done:]], off + done)
                except OSError as e:
                    raise LayercakeError(f"KV cache file {self.path}: {e.strerror}") from e
                if n == 0:
                    raise LayercakeError(f"KV cache file {self.path} is shorter than expected")
                done += n

        if pool is None or len(spans) < 2:
            for s in spans:
                one(*s)
            return
        chunks = [spans[i::READERS] for i in range(READERS)]
        futures = [pool.submit(lambda c=c: [one(*s) for s in c]) for c in chunks if c]
        errors = [f.exception() for f in futures]  # every read ends before an error leaves
        for e in errors:
            if e is not None:
                raise e

    def close(self) -> None:
        for fd in (self.direct, self.buffered):
            if fd >= 0:
                os.close(fd)
        self.direct = self.buffered = -1

    def __del__(self) -> None:
        try:
            self.close()
        except OSError:
            pass


class KVStream:
    """Reads micro-batches' cached slots of disk layers into a ring of RAM buffers ahead of
    their compute and writes the new slots back behind it; ``drain`` waits for the writes."""

    def __init__(self, pin: bool = False) -> None:
        self.pin = pin  # page-locked buffers (CUDA: copied to the device from there)
        self.readers = ThreadPoolExecutor(READERS, thread_name_prefix="layercake-kv-read")
        self.fetcher = ThreadPoolExecutor(1, thread_name_prefix="layercake-kv-fetch")
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="layercake-kv-write")
        self.size = 0
        self.bufs: list[torch.Tensor] = []
        self.free: queue.Queue[int] = queue.Queue()
        self.live: dict[object, tuple[int, Future, DiskKV, DiskKV, int, int]] = {}
        self.writes: list[Future] = []
        self.bytes_read = self.bytes_written = 0

    def _ring(self, nbytes: int) -> None:
        if nbytes <= self.size:
            return
        self.drain()
        assert not self.live, "the ring grows only between forward passes"
        self.size = -(-nbytes // ALIGN) * ALIGN
        self.bufs = [host_buffer(2 * self.size, self.pin) for _ in range(RING)]
        self.free = queue.Queue()
        for i in range(RING):
            self.free.put(i)

    def _views(self, slot: int, k: DiskKV, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        B, n_kv, cap, hd = k.shape
        n = cap * rows * n_kv * hd
        out = []
        for half in (0, 1):
            raw = self.bufs[slot][half * self.size : half * self.size + n * k.dtype.itemsize]
            out.append(raw.view(k.dtype).view(cap, rows, n_kv, hd))
        return out[0], out[1]

    def fetch(self, key: object, k: DiskKV, v: DiskKV, row0: int, rows: int, upto: int) -> None:
        """Start reading slots [0, upto) of rows [row0, row0 + rows) of ``k`` and ``v``."""
        if key in self.live:
            return
        B, n_kv, cap, hd = k.shape
        self._ring(cap * rows * n_kv * hd * k.dtype.itemsize)
        slot = self.free.get()  # a buffer whose write-back has finished
        kb, vb = self._views(slot, k, rows)

        def read() -> None:
            for f, b in ((k, kb), (v, vb)):
                f.transfer(b, row0, rows, 0, upto, False, self.readers)
            self.bytes_read += 2 * upto * rows * k.row_bytes

        self.live[key] = (slot, self.fetcher.submit(read), k, v, row0, rows)

    def get(self, key: object) -> tuple[torch.Tensor, torch.Tensor]:
        """The (rows, n_kv, capacity, hd) keys and values of a fetched micro-batch."""
        slot, fut, k, _, _, rows = self.live[key]
        try:
            fut.result()
        except BaseException:
            self.live.pop(key)
            self.free.put(slot)
            raise
        kb, vb = self._views(slot, k, rows)
        return kb.permute(1, 2, 0, 3), vb.permute(1, 2, 0, 3)

    def store(self, key: object, start: int, end: int) -> None:
        """Write slots [start, end) back behind the compute; the buffer is then free again."""
        slot, _, k, v, row0, rows = self.live.pop(key)
        kb, vb = self._views(slot, k, rows)

        def write() -> None:
            try:
                for f, b in ((k, kb), (v, vb)):
                    f.transfer(b, row0, rows, start, end, True)
                self.bytes_written += 2 * (end - start) * rows * k.row_bytes
            finally:
                self.free.put(slot)

        self.writes.append(self.writer.submit(write))

    def drain(self) -> None:
        """Wait for every write; raise the first error."""
        writes, self.writes = self.writes, []
        errors = [f.exception() for f in writes]
        for e in errors:
            if e is not None:
                raise e

    def abandon(self) -> None:
        """Give back the buffers of micro-batches fetched but never stored (a failed pass)."""
        for slot, fut, *_ in self.live.values():
            fut.exception()  # the read is over before its buffer is reused
            self.free.put(slot)
        self.live.clear()

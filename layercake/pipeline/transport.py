"""Frames over ``torch.distributed`` point-to-point: a fixed int64 header tensor, then the payload
tensors it describes. Nothing is unpickled from the network: the receiver allocates each payload
from the header (dtype code and shape, checked against limits) and receives raw tensor bytes.

Header (``HEADER`` int64): ``[MAGIC, kind, arg0..arg5, n_payloads, (dtype, ndim, d0, d1, d2) x 4]``.
Every wait has a deadline; a peer that dies or stays silent raises ``PeerError`` naming it.
"""

from __future__ import annotations

import datetime
import math
import time
from dataclasses import dataclass
from enum import IntEnum

import torch
import torch.distributed as dist

from layercake.errors import LayercakeError
from layercake.offload.tiers import mapped_empty
from layercake.pipeline.topology import Node

MAGIC = 0x4C43_5031  # "LCP1"
HEADER = 32
MAX_PAYLOADS = 4
MAX_DIMS = 3
MAX_FRAME_BYTES = 1 << 36  # a header asking for more is corrupt, not allocated
TEXT_BYTES = 4096  # an ERROR frame's message, at most
MAPPED_PAYLOAD = 1 << 20  # payloads of this many bytes and more: in a mapping of their own
FOREVER = 30 * 24 * 3600.0  # an idle worker waits for the next job as long as rank 0 lives

DTYPE_CODES = {
    torch.float32: 1, torch.bfloat16: 2, torch.float16: 3, torch.int64: 4, torch.uint8: 5,
}  # fmt: skip
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}


class Kind(IntEnum):
    NEW_CACHE = 1  # args: cache_id, capacity; payload: micro-batch sizes (int64)
    FORWARD = 2  # args: cache_id, T, last_only, has_mask; payload: positions, mask (uint8)
    SELECT = 3  # args: cache_id; payload: rows kept (int64)
    DATA = 4  # args: cache_id, micro-batch; payload: token ids or hidden states or logits
    ERROR = 5  # args: cache_id, micro-batch, peer lost; payload: utf-8 message (uint8)
    SHUTDOWN = 6


class BadFrame(LayercakeError):
    """A frame that breaks the protocol or the job's limits: rejected before allocation."""


class PeerError(LayercakeError):
    """A peer died, closed the connection or did not answer in time."""

    def __init__(self, message: str, node: str) -> None:
        super().__init__(message)
        self.node = node


@dataclass
class Frame:
    kind: Kind
    args: list[int]
    tensors: list[torch.Tensor]


def encode_text(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(text.encode()[:TEXT_BYTES] or b"?"), dtype=torch.uint8)


def decode_text(t: torch.Tensor) -> str:
    return bytes(t.tolist()).decode(errors="replace")


class Transport:
    """Point-to-point frames between the ranks of a job; counts what it moves."""

    def __init__(self, nodes: list[Node], rank: int, timeout: float) -> None:
        self.nodes, self.rank, self.timeout = nodes, rank, timeout
        self.pending: list[tuple[int, list[dist.Work], list[torch.Tensor]]] = []
        self.bytes_sent = self.bytes_received = 0  # payload bytes
        self.frames_sent = self.frames_received = 0
        cuda = [n.device.startswith("cuda") for n in nodes]
        self.cuda_wire = {r for r, c in enumerate(cuda) if c} if cuda[rank] else set()

    def wire_device(self, peer: int) -> torch.device:
        """CUDA tensors go over NCCL between two CUDA nodes; everything else over gloo (CPU)."""
        if peer in self.cuda_wire and dist.get_backend() != "gloo":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def send(self, dst: int, kind: Kind, args: tuple[int, ...] = (),
             tensors: tuple[torch.Tensor, ...] | list[torch.Tensor] = ()) -> None:  # fmt: skip
        """Queue a frame to ``dst`` (non-blocking); ``flush`` waits for every queued frame."""
        header = torch.zeros(HEADER, dtype=torch.int64)
        header[0], header[1] = MAGIC, int(kind)
        header[2 : 2 + len(args)] = torch.tensor(args, dtype=torch.int64)
        header[8] = len(tensors)
        wire = self.wire_device(dst)
        out = []
        for i, t in enumerate(tensors):
            if t.dtype == torch.bool:
                t = t.to(torch.uint8)
            t = t.detach().to(wire).contiguous()
            f = 9 + 5 * i
            header[f], header[f + 1] = DTYPE_CODES[t.dtype], t.dim()
            header[f + 2 : f + 2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
            out.append(t)
            self.bytes_sent += t.numel() * t.element_size()
        try:
            works = [dist.isend(header, dst)] + [dist.isend(t, dst) for t in out]
        except RuntimeError as e:
            raise self._peer_error(dst, e, "sending to") from None
        self.pending = [f for f in self.pending if not self._sent(f)]
        self.pending.append((dst, works, [header, *out]))
        self.frames_sent += 1

    def _sent(self, frame: tuple[int, list[dist.Work], list[torch.Tensor]]) -> bool:
        """Whether a queued frame is out (its errors raised as ``flush`` would): its tensors are
        then let go, so a prompt's pieces sent one after another are not all held until the
        pass ends (4 x 4 MB per segment on rank 0 at batch 64)."""
        dst, works, _ = frame
        if not all(w.is_completed() for w in works):
            return False
        for w in works:
            self._wait(w, dst, self.timeout, "sending to")
        return True

    def flush(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.timeout)
        pending, self.pending = self.pending, []
        for dst, works, _ in pending:
            for w in works:
                self._wait(w, dst, deadline - time.monotonic(), "sending to")

    def drop_pending(self) -> None:
        self.pending = []

    def recv(self, src: int, timeout: float | None = None, max_bytes: int | None = None) -> Frame:
        """The next frame from ``src``; ``PeerError`` if it dies or is silent past ``timeout``.
        A header asking for more than ``max_bytes`` of payload (what the job can need there) is
        rejected before anything is allocated (``BadFrame``)."""
        limit = timeout or self.timeout
        cap = min(MAX_FRAME_BYTES, max(max_bytes or MAX_FRAME_BYTES, TEXT_BYTES))
        header = torch.zeros(HEADER, dtype=torch.int64)
        self._wait(self._irecv(header, src), src, limit, "waiting for")
        h = header.tolist()
        who = self.nodes[src].describe()
        if h[0] != MAGIC or h[1] not in Kind._value2member_map_ or not 0 <= h[8] <= MAX_PAYLOADS:
            raise BadFrame(f"node {who} sent a malformed frame header: is it a layercake node of "
                           "the same version?")  # fmt: skip
        specs, total = [], 0
        for i in range(h[8]):  # every payload checked before any is allocated
            code, ndim, *dims = h[9 + 5 * i : 14 + 5 * i]
            shape = dims[:ndim]
            if code not in CODE_DTYPES or not 0 <= ndim <= MAX_DIMS or min(shape, default=0) < 0:
                raise BadFrame(f"node {who} sent a malformed frame header (payload {i})")
            dtype = CODE_DTYPES[code]
            total += dtype.itemsize * math.prod(shape)
            specs.append((shape, dtype))
        if total > cap:
            raise BadFrame(f"node {who} sent a {Kind(h[1]).name} frame of {total} bytes, more "
                           f"than this job allows there ({cap})")  # fmt: skip
        tensors = []
        wire = self.wire_device(src)
        for shape, dtype in specs:
            big = wire.type == "cpu" and dtype.itemsize * math.prod(shape) >= MAPPED_PAYLOAD
            # a large payload (logits, a prompt piece's hidden states) in a mapping of its own:
            # one a step from the heap leaves holes that grow it (``tiers.mapped_empty``)
            t = mapped_empty(shape, dtype) if big else torch.empty(shape, dtype=dtype, device=wire)
            self._wait(self._irecv(t, src), src, limit, "waiting for")
            tensors.append(t)
        self.bytes_received += total
        self.frames_received += 1
        return Frame(Kind(h[1]), h[2:8], tensors)

    def _irecv(self, t: torch.Tensor, src: int) -> dist.Work:
        try:
            return dist.irecv(t, src)
        except RuntimeError as e:
            raise self._peer_error(src, e, "waiting for") from None

    def _wait(self, work: dist.Work, peer: int, seconds: float, what: str) -> None:
        try:
            work.wait(datetime.timedelta(seconds=max(0.001, seconds)))
        except RuntimeError as e:
            raise self._peer_error(peer, e, what, seconds) from None

    def _peer_error(self, peer: int, e: Exception, what: str, seconds: float = 0.0) -> PeerError:
        node = self.nodes[peer]
        text = str(e)
        if "Timed out" in text or "timeout" in text.lower() and "closure" not in text:
            msg = (f"node {node.describe()} did not answer within {seconds:.0f} s while "
                   f"{self.nodes[self.rank].name} was {what} it: stopped, overloaded or "
                   "unreachable")  # fmt: skip
        else:
            first = text.splitlines()[0] if text else type(e).__name__
            if "]" in first:
                first = first.split("]", 1)[1].strip()
            first = first.split(". This is typically")[0]
            msg = (f"lost the connection to node {node.describe()} while {what} it: the worker "
                   f"died or was stopped ({first[:160]})")  # fmt: skip
        return PeerError(msg, node.name)

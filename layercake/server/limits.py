"""What one client may ask of the server: the body size (413 before it is read past the limit),
and admission (a bounded number of sequences accepted at once, 429 + ``Retry-After`` past it)."""

from __future__ import annotations

import asyncio

from fastapi import Request

from layercake.server.errors import APIError

DEFAULT_MAX_BODY = 2 * 2**20  # bytes of one request body
DEFAULT_MAX_QUEUE = 64  # sequences waiting for a slot, beyond the slots themselves
DEFAULT_MAX_PROMPTS = 16  # prompts in one /v1/completions list
RETRY_AFTER_S = 1
BODY_TIMEOUT_S = 30.0  # a body still incomplete after this is a 408 (it holds an admission place)


def _too_large(size: int, limit: int, streamed: bool) -> APIError:
    size_ = "" if streamed else f"{size} bytes, "
    return APIError(
        413,
        f"the request body is {size_}more than the server's limit of {limit} bytes (--max-body)",
        code="request_too_large",
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes:
    from its Content-Length before reading anything, else while it streams in; 408 if it has
    not all arrived within ``BODY_TIMEOUT_S`` (a slow client must not hold its place)."""
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            return await _read(request, limit)
    except TimeoutError:
        raise APIError(
            408, f"the request body did not arrive within {BODY_TIMEOUT_S:g} s", code="timeout"
        ) from None


async def _read(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise APIError(400, f"invalid Content-Length {length!r}")
        if int(length) > limit:
            raise _too_large(int(length), limit, streamed=False)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit, streamed=True)
        chunks.append(chunk)
    return b"".join(chunks)


class Admission:
    """Sequences accepted and not yet finished, at most ``slots + max_queue``. Used from the
    event loop's thread only (no lock needed)."""

    def __init__(self, slots: int, max_queue: int) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.slots, self.limit, self.used = slots, slots + max_queue, 0

    def ticket(self) -> Ticket:
        """One place for a request that has just arrived (before its body is read)."""
        t = Ticket(self)
        t.resize(1)
        return t

    @property
    def waiting(self) -> int:
        """Accepted sequences beyond the slots (an upper bound on those without one)."""
        return max(0, self.used - self.slots)


class Ticket:
    """The places one request holds in an ``Admission``; ``close`` gives them back."""

    def __init__(self, admission: Admission) -> None:
        self.admission, self.held = admission, 0

    def resize(self, n: int) -> None:
        """Hold ``n`` places (one per prompt), or raise a 429 and hold what it held."""
        a = self.admission
        if n > a.limit:  # could never be admitted
            raise APIError(
                400,
                f"{n} prompts in one request, more than the {a.limit} sequences the server "
                "accepts at once",
                param="prompt",
            )
        if a.used - self.held + n > a.limit:
            raise APIError(
                429,
                f"the server is busy: {a.used} of {a.limit} sequences accepted (--batch-size "
                f"slots + --max-queue); retry after {RETRY_AFTER_S} s",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        a.used += n - self.held
        self.held = n

    def close(self) -> None:
        self.admission.used -= self.held
        self.held = 0

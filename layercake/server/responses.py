"""OpenAI's response bodies from engine events: one JSON object (``collect``) or server-sent
event chunks (``sse``), with logprobs and usage."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from layercake.engine import Request as EngineRequest
from layercake.generate import StepEvent
from layercake.jobs.requests import token_text
from layercake.server.errors import APIError, server_error

if TYPE_CHECKING:
    from layercake.llm import LLM


class SSEResponse(StreamingResponse):
    """A stream that calls ``on_close`` however it ends (done, client gone, error), even if
    its generator never started."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream")
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def events(reqs: list[EngineRequest]) -> AsyncIterator[tuple[int, StepEvent]]:
    """Events of every request as they come, until each has finished."""
    pending = {i: asyncio.ensure_future(r.tag.queue.get()) for i, r in enumerate(reqs)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending.values(), return_when=asyncio.FIRST_COMPLETED)
            for i in [i for i, f in pending.items() if f in done]:
                item = pending.pop(i).result()
                if isinstance(item, Exception):
                    raise APIError(500, f"the engine failed: {item}", "server_error")
                if item.finish_reason is None:
                    pending[i] = asyncio.ensure_future(reqs[i].tag.queue.get())
                yield i, item
    finally:
        for f in pending.values():
            f.cancel()


def _logprobs(llm: LLM, evs: list[StepEvent], chat: bool, offset: int = 0) -> dict[str, Any]:
    lps = [e.logprob for e in evs if e.logprob is not None]
    toks = [token_text(llm, lp.token_id) for lp in lps]
    if chat:
        return {
            "content": [
                {
                    "token": t,
                    "logprob": lp.logprob,
                    "bytes": list(t.encode()),
                    "top_logprobs": [
                        {
                            "token": (s := token_text(llm, k)),
                            "logprob": v,
                            "bytes": list(s.encode()),
                        }
                        for k, v in lp.top_logprobs.items()
                    ],
                }
                for t, lp in zip(toks, lps)
            ]
        }
    offsets, pos = [], offset
    for t in toks:
        offsets.append(pos)
        pos += len(t)
    return {
        "tokens": toks,
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": [{token_text(llm, k): v for k, v in lp.top_logprobs.items()} for lp in lps],
        "text_offset": offsets,
    }


def _usage(reqs: list[EngineRequest], completion_tokens: int) -> dict[str, int]:
    n_prompt = sum(len(r.prompt) for r in reqs)
    return {
        "prompt_tokens": n_prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": n_prompt + completion_tokens,
    }


async def collect(
    llm: LLM, reqs: list[EngineRequest], chat: bool, meta: dict[str, Any]
) -> dict[str, Any]:
    """The whole answer as one JSON object."""
    evs: list[list[StepEvent]] = [[] for _ in reqs]
    async for i, ev in events(reqs):
        evs[i].append(ev)
    choices = []
    for i, e in enumerate(evs):
        text = "".join(x.text for x in e)
        lp = _logprobs(llm, e, chat) if reqs[i].params.logprobs is not None else None
        c: dict[str, Any] = {"index": i, "finish_reason": e[-1].finish_reason, "logprobs": lp}
        if chat:
            c["message"] = {"role": "assistant", "content": text}
        else:
            c["text"] = text
        choices.append(c)
    obj = "chat.completion" if chat else "text_completion"
    usage = _usage(reqs, sum(map(len, evs)))
    return {**meta, "object": obj, "choices": choices, "usage": usage}


async def sse(
    llm: LLM, reqs: list[EngineRequest], chat: bool, meta: dict[str, Any], include_usage: bool
) -> AsyncIterator[str]:
    """The answer as server-sent events, token by token; with ``include_usage`` every chunk
    has ``usage: null`` and a last chunk (no choices) carries the usage, as OpenAI sends."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    offsets = [0] * len(reqs)
    extra = {"usage": None} if include_usage else {}

    def chunk(choices: list[dict[str, Any]], **more: Any) -> str:
        body = {**meta, "object": obj, "choices": choices, **extra, **more}
        return f"data: {json.dumps(body)}\n\n"

    if chat:
        first = {"role": "assistant", "content": ""}
        yield chunk([{"index": 0, "delta": first, "finish_reason": None, "logprobs": None}])
    n_out = 0
    try:
        async for i, ev in events(reqs):
            n_out += 1
            lp = None
            if reqs[i].params.logprobs is not None:
                lp = _logprobs(llm, [ev], chat, offsets[i])
            offsets[i] += len(ev.text)
            c: dict[str, Any] = {"index": i, "finish_reason": ev.finish_reason, "logprobs": lp}
            if chat:
                c["delta"] = {"content": ev.text} if ev.text else {}
            else:
                c["text"] = ev.text
            yield chunk([c])
    except Exception as e:  # headers are sent: the error is the stream's last event
        err = e if isinstance(e, APIError) else server_error(e)
        yield f"data: {json.dumps(err.body())}\n\n"
    else:
        if include_usage:
            yield chunk([], usage=_usage(reqs, n_out))
    yield "data: [DONE]\n\n"

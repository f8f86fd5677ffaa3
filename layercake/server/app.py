"""OpenAI-compatible HTTP API (FastAPI + uvicorn): ``/v1/models``, ``/v1/completions`` and
``/v1/chat/completions``, streamed over SSE on request.

One engine thread runs the continuous-batching loop: requests arriving from the event loop go
through a queue into free slots, and each token goes back to its request's asyncio queue, so
concurrent requests are decoded together step by step, each with its own sampler and seed.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from layercake.checkpoint.locate import model_label
from layercake.engine import Engine, default_capacity
from layercake.engine import Request as EngineRequest
from layercake.errors import LayercakeError
from layercake.generate import StepEvent
from layercake.jobs.requests import RequestError, parse_sampling, prompt_ids, token_text
from layercake.server.page import add_chat_page

if TYPE_CHECKING:
    from layercake.llm import LLM

DEFAULT_CONTEXT = 1024  # prompt + completion tokens per request when --max-context is not given


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type_,
            param,
            code,
        )

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


class _Reply:
    """Where the engine thread puts one request's events (thread-safe into the event loop)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, index: int) -> None:
        self.loop, self.index = loop, index
        self.queue: asyncio.Queue[StepEvent | Exception] = asyncio.Queue()

    def put(self, item: StepEvent | Exception) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed (shutting down): nobody is listening
            pass


class EngineLoop:
    """The engine and the thread that steps it."""

    def __init__(self, llm: LLM, slots: int, context: int) -> None:
        self.llm = llm
        self.engine = Engine(
            llm.runner, llm.eos_token_ids, llm._decode, slots, default_capacity(context)
        )
        self.inbox: queue.Queue[EngineRequest | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True, name="layercake-engine")
        self.thread.start()

    def submit(self, req: EngineRequest) -> None:
        self.engine.check(req.prompt, req.params)  # pure: safe from the event loop's thread
        self.inbox.put(req)

    def stop(self) -> None:
        self.inbox.put(None)
        self.thread.join(timeout=10)

    def _run(self) -> None:
        eng = self.engine
        while True:
            block = not eng.busy
            try:
                while True:
                    req = self.inbox.get(block=block)
                    block = False
                    if req is None:
                        return
                    try:
                        eng.add(req)
                    except LayercakeError as e:  # checked on submit already; never fatal here
                        req.tag.put(e)
            except queue.Empty:
                pass
            try:
                events = eng.step()
            except Exception as e:  # an engine bug: fail the requests in flight, keep serving
                running = [s.request for s in eng.seqs if s is not None] + list(eng.waiting)
                for r in running:
                    r.tag.put(e)
                self.engine = eng = Engine(
                    eng.runner, list(eng.eos), eng.decode, eng.slots, eng.capacity
                )
                continue
            for req, ev in events:
                req.tag.put(ev)


def create_app(
    llm: LLM,
    slots: int = 16,
    max_context: int | None = None,
    api_key: str | None = None,
    model_name: str | None = None,
) -> FastAPI:
    """The FastAPI app over ``llm``: ``slots`` sequences decoded together, each request's
    prompt + completion within ``max_context`` tokens."""
    context = min(max_context or DEFAULT_CONTEXT, llm.runner.max_context)
    loop_holder = EngineLoop(llm, slots, context)
    name = model_name or model_label(llm.path)
    app = FastAPI(title="layercake", on_shutdown=[loop_holder.stop])
    app.state.engine = loop_holder

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Any:
        auth = request.headers.get("authorization")  # the API's key (the chat page asks for it)
        if (
            api_key is not None
            and auth != f"Bearer {api_key}"
            and request.url.path.startswith("/v1/")
        ):
            return APIError(
                401, "Incorrect API key provided", param=None, code="invalid_api_key"
            ).response()
        return await call_next(request)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": name, "object": "model", "created": 0, "owned_by": "layercake"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await _complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await _complete(request, chat=True)

    add_chat_page(app, llm, name, context, slots)  # the chat page at / and /v1/info

    async def _complete(request: Request, chat: bool) -> Any:
        body = await _json(request)
        prompts, params = _parse(llm, body, chat, context)
        loop = asyncio.get_running_loop()
        reqs = [EngineRequest(p, params, tag=_Reply(loop, i)) for i, p in enumerate(prompts)]
        try:
            for r in reqs:
                loop_holder.submit(r)
        except LayercakeError as e:
            for r in reqs:
                r.cancelled = True
            param = "max_tokens" if "max_new" in str(e) else "prompt"
            raise APIError(400, str(e), param=param) from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        meta = {"id": rid, "created": int(time.time()), "model": name}
        if body.get("stream"):
            return StreamingResponse(_sse(llm, reqs, chat, meta), media_type="text/event-stream")
        return await _collect(llm, reqs, chat, meta)

    return app


async def _json(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except ValueError as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def _parse(llm: LLM, body: dict[str, Any], chat: bool, context: int) -> tuple[list[list[int]], Any]:
    try:
        if body.get("n") not in (None, 1):
            raise RequestError("only n=1 is supported", "n")
        if body.get("echo"):
            raise RequestError("echo is not supported", "echo")
        if chat:
            if body.get("messages") is None:
                raise RequestError("missing messages", "messages")
            prompts = [prompt_ids(llm, {"messages": body["messages"]})]
        else:
            p = body.get("prompt")
            many = isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p)
            prompts = [prompt_ids(llm, {"prompt": x}) for x in (p if many else [p])]
        defaults: dict[str, Any] = {"temperature": 1.0}  # OpenAI's defaults
        if chat:  # no max_tokens: up to the context
            defaults["max_new_tokens"] = max(1, context - max(map(len, prompts)))
        params = parse_sampling(body, defaults, chat_logprobs=chat)
    except RequestError as e:
        raise APIError(400, str(e), param=e.param) from None
    except LayercakeError as e:
        raise APIError(400, str(e)) from None
    return prompts, params


async def _events(reqs: list[EngineRequest]) -> AsyncIterator[tuple[int, StepEvent]]:
    """Events of every request as they come, until each has finished; cancels on exit."""
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
        for r in reqs:
            if not r.finished:
                r.cancelled = True  # a client gone: its slot goes to the next request


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


async def _collect(
    llm: LLM, reqs: list[EngineRequest], chat: bool, meta: dict[str, Any]
) -> dict[str, Any]:
    evs: list[list[StepEvent]] = [[] for _ in reqs]
    async for i, ev in _events(reqs):
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
    n_prompt = sum(len(r.prompt) for r in reqs)
    n_out = sum(map(len, evs))
    usage = {
        "prompt_tokens": n_prompt,
        "completion_tokens": n_out,
        "total_tokens": n_prompt + n_out,
    }
    obj = "chat.completion" if chat else "text_completion"
    return {**meta, "object": obj, "choices": choices, "usage": usage}


async def _sse(
    llm: LLM, reqs: list[EngineRequest], chat: bool, meta: dict[str, Any]
) -> AsyncIterator[str]:
    obj = "chat.completion.chunk" if chat else "text_completion"
    offsets = [0] * len(reqs)

    def chunk(choice: dict[str, Any]) -> str:
        return f"data: {json.dumps({**meta, 'object': obj, 'choices': [choice]})}\n\n"

    if chat:
        yield chunk(
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "finish_reason": None,
                "logprobs": None,
            }
        )
    try:
        async for i, ev in _events(reqs):
            lp = None
            if reqs[i].params.logprobs is not None:
                lp = _logprobs(llm, [ev], chat, offsets[i])
            offsets[i] += len(ev.text)
            c: dict[str, Any] = {"index": i, "finish_reason": ev.finish_reason, "logprobs": lp}
            if chat:
                c["delta"] = {"content": ev.text} if ev.text else {}
            else:
                c["text"] = ev.text
            yield chunk(c)
    except APIError as e:
        yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.type}})}\n\n"
    yield "data: [DONE]\n\n"


def serve(
    llm: LLM, slots: int, max_context: int | None, host: str, port: int, api_key: str | None
) -> None:
    """Run the server until interrupted."""
    import uvicorn

    app = create_app(llm, slots, max_context, api_key)
    uvicorn.run(app, host=host, port=port, log_level="info")

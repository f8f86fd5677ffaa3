"""OpenAI-compatible HTTP API (FastAPI + uvicorn): ``/v1/models``, ``/v1/completions`` and
``/v1/chat/completions``, streamed over SSE on request; ``/health`` and ``/metrics``.

One engine thread runs the continuous-batching loop (``engine_loop``). A request is admitted
before its body is read (429 past ``slots + max_queue`` sequences), its body is read up to
``max_body`` bytes (413), then parsed and tokenized in a worker thread (``validate``), so a large
body never stalls the other streams; a client that goes away frees its slots."""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from layercake.checkpoint.locate import model_label
from layercake.engine import Request as EngineRequest
from layercake.errors import LayercakeError
from layercake.server.engine_loop import EngineLoop, Reply
from layercake.server.errors import APIError, install_error_handlers
from layercake.server.limits import (
    DEFAULT_MAX_BODY,
    DEFAULT_MAX_PROMPTS,
    DEFAULT_MAX_QUEUE,
    Admission,
    read_body,
)
from layercake.server.metrics import Metrics
from layercake.server.page import add_chat_page
from layercake.server.responses import SSEResponse, collect, sse
from layercake.server.validate import Parsed, check_model, parse_request

if TYPE_CHECKING:
    from layercake.llm import LLM

DEFAULT_CONTEXT = 1024  # prompt + completion tokens per request when --max-context is not given
CLIENT_GONE = 499  # the status counted for a request whose client left before its answer


class _Gate:
    """ASGI middleware: the API key on /v1/* (/health and /metrics stay open for probes), and
    every answer counted by endpoint and status."""

    def __init__(self, app: ASGIApp, api_key: str | None, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics
        self.expected = f"Bearer {api_key}".encode() if api_key is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = CLIENT_GONE

        async def counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.expected is not None and scope["path"].startswith("/v1/"):
                given = dict(scope["headers"]).get(b"authorization", b"")
                if not hmac.compare_digest(given, self.expected):
                    err = APIError(401, "Incorrect API key provided", code="invalid_api_key")
                    return await err.response()(scope, receive, counted)
            await self.app(scope, receive, counted)
        except Exception:
            status = 500
            raise
        finally:
            self.metrics.count_request(scope["path"], status)


def create_app(
    llm: LLM,
    slots: int = 16,
    max_context: int | None = None,
    api_key: str | None = None,
    model_name: str | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_prompts: int = DEFAULT_MAX_PROMPTS,
    verbose: bool = False,
) -> FastAPI:
    """The FastAPI app over ``llm``: ``slots`` sequences decoded together, each request's
    prompt + completion within ``max_context`` tokens; bodies up to ``max_body`` bytes; up to
    ``max_queue`` sequences waiting for a slot; up to ``max_prompts`` prompts per request.
    ``verbose``: a roofline line on stderr each time the engine runs dry."""
    context = serve_context(llm, max_context)
    metrics = Metrics()
    loop_holder = EngineLoop(llm, slots, context, metrics, verbose)
    admission = Admission(slots, max_queue)
    name = model_name or model_label(llm.path)
    names = {name, llm.path.name, str(llm.path)}
    app = FastAPI(title="layercake", on_shutdown=[loop_holder.stop])
    app.state.engine, app.state.admission, app.state.metrics = loop_holder, admission, metrics
    app.add_middleware(_Gate, api_key=api_key, metrics=metrics)
    install_error_handlers(app)

    _info_routes(app, name, names, slots, max_queue)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await _complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await _complete(request, chat=True)

    add_chat_page(app, llm, name, context, slots)  # the chat page at / and /v1/info

    def prepare(raw: bytes, chat: bool) -> Parsed:  # in a worker thread
        parsed = parse_request(llm, raw, chat, names, context, max_prompts)
        for p in parsed.prompts:
            try:
                loop_holder.check(EngineRequest(p, parsed.params))
            except LayercakeError as e:
                param = "max_tokens" if "max_new" in str(e) else "prompt"
                raise APIError(400, str(e), param=param) from None
        return parsed

    async def _complete(request: Request, chat: bool) -> Any:
        ticket = admission.ticket()  # 429 before anything is read
        reqs: list[EngineRequest] = []

        def close() -> None:
            for r in reqs:
                if not r.finished:
                    r.cancelled = True  # its slot goes to the next request
            ticket.close()

        handed_over = False
        try:
            raw = await read_body(request, max_body)
            parsed = await asyncio.to_thread(prepare, raw, chat)
            ticket.resize(len(parsed.prompts))
            loop = asyncio.get_running_loop()
            for i, p in enumerate(parsed.prompts):
                reqs.append(EngineRequest(p, parsed.params, tag=Reply(loop, i)))
                loop_holder.submit(reqs[-1])
            rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
            meta = {"id": rid, "created": int(time.time()), "model": name}
            if parsed.stream:
                handed_over = True
                return SSEResponse(sse(llm, reqs, chat, meta, parsed.include_usage), close)
            return await _unless_disconnected(request, collect(llm, reqs, chat, meta))
        finally:
            if not handed_over:
                close()

    return app


def _info_routes(app: FastAPI, name: str, names: set[str], slots: int, max_queue: int) -> None:
    """The model list, health and Prometheus metrics routes."""
    engine, metrics, admission = app.state.engine, app.state.metrics, app.state.admission
    card = {"id": name, "object": "model", "created": 0, "owned_by": "layercake"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        check_model(model, names)
        return card

    @app.get("/health")
    async def health() -> JSONResponse:
        up = engine.alive
        body = {
            "status": "ok" if up else "engine stopped",
            "model": name,
            "slots": slots,
            "slots_in_use": engine.slots_in_use,
            "queue_depth": engine.waiting,
            "max_queue": max_queue,
        }
        return JSONResponse(body, status_code=200 if up else 503)

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        gauges = {
            "layercake_up": ("1 while the engine thread runs.", int(engine.alive)),
            "layercake_slots": ("KV cache slots (sequences decoded together).", slots),
            "layercake_slots_in_use": ("Slots decoding a sequence.", engine.slots_in_use),
            "layercake_queue_depth": ("Sequences waiting for a slot.", engine.waiting),
            "layercake_accepted_sequences": ("Sequences admitted, not finished.", admission.used),
            "layercake_tokens_per_second": ("Tokens/s, last 10 s.", metrics.tokens_per_s()),
        }
        return PlainTextResponse(metrics.render(gauges), media_type="text/plain; version=0.0.4")


async def _unless_disconnected(request: Request, work: Coroutine[Any, Any, Any]) -> Any:
    """``work``'s result, or (cancelling it) an empty 499 if the client goes away first."""

    async def gone() -> None:  # the body is read: what remains to receive is the disconnect
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(gone())
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        return task.result()
    return Response(status_code=CLIENT_GONE)


def serve_context(llm: LLM, max_context: int | None) -> int:
    """Prompt + completion tokens a request may use: ``max_context`` or the default, within
    the model's context."""
    return min(max_context or DEFAULT_CONTEXT, llm.runner.max_context)


def serve(
    llm: LLM,
    slots: int,
    max_context: int | None,
    host: str,
    port: int,
    api_key: str | None,
    max_body: int = DEFAULT_MAX_BODY,
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_prompts: int = DEFAULT_MAX_PROMPTS,
    verbose: bool = False,
) -> None:
    """Run the server until interrupted (a compiled step is built before it listens: see
    ``cli.cmd_serve``)."""
    import uvicorn

    app = create_app(
        llm, slots, max_context, api_key, max_body=max_body, max_queue=max_queue,
        max_prompts=max_prompts, verbose=verbose,
    )  # fmt: skip
    uvicorn.run(app, host=host, port=port, log_level="info")

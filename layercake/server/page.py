"""The chat page ``serve`` shows at ``/`` (as llama.cpp's server does): plain HTML, CSS and JS
from ``static/`` (no build step, no CDN; open without the API key, which the page asks for and
sends), talking to the API on the same origin; and
``/v1/info``, the few facts the page shows about the model and the path that runs it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse

from layercake.bench.roofline import runner_path

if TYPE_CHECKING:
    from layercake.llm import LLM

STATIC = Path(__file__).parent / "static"
FILES = {"chat.js": "text/javascript", "chat.css": "text/css"}


def add_chat_page(app: FastAPI, llm: LLM, name: str, context: int, slots: int) -> None:
    """Serve the chat page at ``/`` and the model's facts at ``/v1/info``."""
    has_template = llm._tokenizer is not None and bool(
        getattr(llm._tokenizer, "chat_template", None)
    )
    info = {
        "model": name,
        "path": runner_path(llm.runner),
        "max_context": context,
        "slots": slots,
        "chat_template": has_template,
    }

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/static/{file}", include_in_schema=False)
    async def static(file: str) -> FileResponse:
        if file not in FILES:  # only the page's own files: no path ever reaches the disk
            raise HTTPException(404)
        return FileResponse(STATIC / file, media_type=FILES[file])

    @app.get("/v1/info")
    async def model_info() -> dict[str, Any]:
        return info

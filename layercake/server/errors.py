"""Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, for every
status the server can answer: its own 4xx, FastAPI's 404/405/422, and any unexpected exception
(a 500 that names the exception's type, never a traceback or plain text)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

_TYPES = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error"}


class APIError(Exception):
    """An error answered to the client: HTTP ``status`` and OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or _TYPES.get(status, "invalid_request_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def server_error(e: BaseException) -> APIError:
    """The 500 for an unexpected exception: its type and message, no traceback."""
    return APIError(500, f"internal server error ({type(e).__name__}: {e})", "server_error")


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
        if e.status_code == 404:
            msg = f"Invalid URL ({request.method} {request.url.path})"
        elif e.status_code == 405:
            msg = f"Method {request.method} is not allowed on {request.url.path}"
        else:
            msg = str(e.detail)
        return APIError(e.status_code, msg, headers=e.headers).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        first = (e.errors() or [{}])[0]
        param = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        return APIError(422, str(first.get("msg", "invalid request")), param=param).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        # Starlette re-raises it after this response is sent, so uvicorn logs the traceback
        return server_error(e).response()

"""One request body, from bytes to prompt ids and sampling parameters, checked at the boundary:
anything the server cannot honour is a 4xx naming the field, never silently ignored.

Runs in a worker thread (JSON parsing, chat templates and tokenization of a large body would
otherwise stall every other stream on the event loop)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from layercake.errors import LayercakeError
from layercake.jobs.requests import RequestError, parse_sampling, prompt_ids
from layercake.sampling import SamplingParams
from layercake.server.errors import APIError

if TYPE_CHECKING:
    from layercake.llm import LLM

MAX_STOP = 16  # stop strings per request (OpenAI allows 4)
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# field -> the values that mean "not used"; anything else asks for what the server lacks
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "best_of": (1,),
    "echo": (False,),
    "suffix": ("",),
    "tools": ([],),
    "functions": ([],),
    "tool_choice": ("none",),
    "function_call": ("none",),
    "logit_bias": ({},),
    "response_format": ({"type": "text"},),
    "modalities": (["text"],),
    "audio": (),
    "prediction": (),
}
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class Parsed:
    """What the server runs for one request."""

    prompts: list[list[int]]
    params: SamplingParams
    stream: bool
    include_usage: bool


def parse_request(
    llm: LLM, raw: bytes, chat: bool, models: set[str], context: int, max_prompts: int
) -> Parsed:
    """Check and tokenize one request body (``models``: the names it may ask for)."""
    body = _json(raw)
    _check_strings(body)
    _check_fields(body, models)
    stream, include_usage = _stream(body)
    try:
        prompts = [_chat_ids(llm, body)] if chat else _completion_ids(llm, body, max_prompts)
        defaults: dict[str, Any] = {"temperature": 1.0}  # OpenAI's defaults
        if chat:  # no max_tokens: up to the context
            defaults["max_new_tokens"] = max(1, context - max(map(len, prompts)))
        params = parse_sampling(body, defaults, chat_logprobs=chat)
    except RequestError as e:
        raise APIError(400, str(e), param=e.param) from None
    except LayercakeError as e:
        raise APIError(400, str(e)) from None
    return Parsed(prompts, params, stream, include_usage)


def _json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None
    except ValueError as e:  # also bytes that are not UTF-8
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def _check_strings(body: dict[str, Any]) -> None:
    """Refuse lone UTF-16 surrogates (``"\\ud800"``), which no tokenizer can encode; walks the
    body without recursion, naming the top-level field."""
    stack: list[tuple[Any, str | None]] = [(body, None)]
    while stack:
        value, field = stack.pop()
        if isinstance(value, dict):
            for k, v in value.items():
                stack += [(k, field or k), (v, field or k)]
        elif isinstance(value, list):
            stack += [(v, field) for v in value]
        elif isinstance(value, str) and _SURROGATE.search(value):
            raise APIError(
                400, f"{field or 'a key'} holds a lone UTF-16 surrogate (invalid text)", param=field
            )


def check_model(model: Any, models: set[str]) -> None:
    """404 ``model_not_found`` unless ``model`` is one of the served ``models``' names."""
    if not isinstance(model, str):
        raise APIError(400, f"model must be a string, got {model!r}", param="model")
    if model not in models:
        raise APIError(
            404,
            f"The model {model!r} does not exist (GET /v1/models lists the served one)",
            param="model",
            code="model_not_found",
        )


def _check_fields(body: dict[str, Any], models: set[str]) -> None:
    if body.get("model") is not None:
        check_model(body["model"], models)
    for name, unused in UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and not any(value == u and type(value) is type(u) for u in unused):
            raise APIError(400, f"{name} is not supported by this server", param=name)
    stop = body.get("stop")
    if isinstance(stop, list) and len(stop) > MAX_STOP:
        raise APIError(
            400, f"stop has {len(stop)} entries; at most {MAX_STOP} are allowed", param="stop"
        )


def _stream(body: dict[str, Any]) -> tuple[bool, bool]:
    stream, options = body.get("stream"), body.get("stream_options")
    if stream is not None and not isinstance(stream, bool):
        raise APIError(400, f"stream must be true or false, got {stream!r}", param="stream")
    if options is None:
        return bool(stream), False
    if not stream:
        raise APIError(
            400, "stream_options is only allowed with stream: true", param="stream_options"
        )
    usage = options.get("include_usage") if isinstance(options, dict) else None
    if not isinstance(options, dict) or not isinstance(usage, (bool, type(None))):
        raise APIError(
            400, "stream_options must be {'include_usage': true|false}", param="stream_options"
        )
    return True, bool(usage)


def _chat_ids(llm: LLM, body: dict[str, Any]) -> list[int]:
    messages = body.get("messages")
    if messages is None:
        raise RequestError("missing messages", "messages")
    if body.get("prompt") is not None:
        raise RequestError("give either prompt or messages, not both", "messages")
    if isinstance(messages, list):
        messages = [_role(i, m) for i, m in enumerate(messages)]
    # LLM.chat_prompt encodes control-token text typed in messages as plain text (where the
    # tokenizer has that option), so "<|im_end|>" typed by a user cannot end its turn
    special = body.get("allow_special_tokens", False)  # an extension: opt in to control tokens
    return prompt_ids(llm, {"messages": messages, "allow_special_tokens": special})


def _role(i: int, m: Any) -> Any:
    if not isinstance(m, dict) or "role" not in m:
        return m  # prompt_ids names the mistake
    role = m["role"]
    if role in ("tool", "function"):
        raise RequestError(f"messages[{i}]: {role} messages are not supported", "messages")
    if role not in ROLES:
        allowed = ", ".join(ROLES)
        raise RequestError(f"messages[{i}].role must be one of {allowed}; got {role!r}", "messages")
    return {**m, "role": ROLES[role]}


def _completion_ids(llm: LLM, body: dict[str, Any], max_prompts: int) -> list[list[int]]:
    p = body.get("prompt")
    many = isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p)
    if many and len(p) > max_prompts:
        raise RequestError(f"{len(p)} prompts in one request; at most {max_prompts}", "prompt")
    return [prompt_ids(llm, {"prompt": x}) for x in (p if many else [p])]

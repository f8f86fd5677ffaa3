"""One request, as the batch job and the server receive it (OpenAI field names): the prompt (text,
token ids, or chat messages) and the sampling parameters, parsed and checked in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from layercake.errors import LayercakeError
from layercake.sampling import SamplingParams

if TYPE_CHECKING:
    from layercake.llm import LLM

# request field -> SamplingParams field
SAMPLING_FIELDS = {
    "max_tokens": "max_new_tokens",
    "max_completion_tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "stop": "stop",
    "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty",
    "repetition_penalty": "repetition_penalty",
    "ignore_eos": "ignore_eos",
}
_BACK = {v: k for k, v in SAMPLING_FIELDS.items() if k != "max_completion_tokens"}


class RequestError(LayercakeError):
    """A mistake in one request; ``param`` names the field (OpenAI's error ``param``)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def parse_sampling(
    body: dict[str, Any], defaults: dict[str, Any] | None = None, chat_logprobs: bool = False
) -> SamplingParams:
    """SamplingParams from a request's fields over ``defaults`` (SamplingParams names).

    ``logprobs`` is a number of alternatives (completions, batch lines), or with
    ``chat_logprobs`` a flag with ``top_logprobs`` the number (chat completions)."""
    kw = dict(defaults or {})
    for name, field in SAMPLING_FIELDS.items():
        if body.get(name) is not None:
            kw[field] = body[name]
    if isinstance(kw.get("stop"), str):
        kw["stop"] = [kw["stop"]]
    elif kw.get("stop") is None:
        kw["stop"] = []
    lp = body.get("logprobs")
    if chat_logprobs:
        if lp not in (None, True, False):
            raise RequestError(f"logprobs must be true or false, got {lp!r}", "logprobs")
        top = body.get("top_logprobs")
        if top is not None and not lp:
            raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
        kw["logprobs"] = (top or 0) if lp else None
    elif lp is not None and lp is not False:
        kw["logprobs"] = 0 if lp is True else lp
    params = SamplingParams(**kw)
    try:
        params.validate()
    except LayercakeError as e:
        field, _, rest = str(e).partition(" ")
        name = "top_logprobs" if chat_logprobs and field == "logprobs" else _BACK.get(field, field)
        raise RequestError(f"{name} {rest}", name) from None
    return params


def check_unicode(value: Any, name: str | None = None) -> None:
    """Raise RequestError if a string anywhere in ``value`` (a parsed JSON value: keys too) is not
    valid Unicode, e.g. a lone surrogate from the escape ``"\\ud800"``: nothing downstream (the
    tokenizer, UTF-8 output) can take it. Iterative, so any nesting depth is fine."""
    stack = [(value, name)]
    while stack:
        v, where = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                at = f"{where} " if where else "a text "
                raise RequestError(
                    f"{at}is not valid Unicode: {v[e.start]!r} at character {e.start} "
                    "(a lone surrogate)",
                    where,
                ) from None
        elif isinstance(v, dict):
            for k, x in v.items():
                stack.append((k, "a field name"))
                stack.append((x, where or (k if isinstance(k, str) else None)))
        elif isinstance(v, list):
            stack.extend((x, where) for x in v)


def prompt_ids(llm: LLM, body: dict[str, Any]) -> list[int]:
    """Token ids of a request's ``prompt`` (text or token ids) or ``messages`` (chat)."""
    check_unicode({k: body.get(k) for k in ("prompt", "messages")})
    if body.get("messages") is not None:
        if body.get("prompt") is not None:
            raise RequestError("give either prompt or messages, not both", "messages")
        special = body.get("allow_special_tokens", False)
        if not isinstance(special, bool):
            raise RequestError("allow_special_tokens must be true or false", "allow_special_tokens")
        # control-token text typed in messages is plain text unless the request asks otherwise
        return llm.chat_prompt(_messages(body["messages"]), allow_special=special)
    prompt = body.get("prompt")
    if prompt is None:
        raise RequestError("missing prompt (or messages)", "prompt")
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError("prompt is empty", "prompt")
        return llm.tokenizer.encode(prompt)
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        return list(prompt)
    raise RequestError("prompt must be a non-empty string or a list of token ids", "prompt")


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a role", "messages")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: only text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise RequestError(f"messages[{i}]: only text content is supported", "messages")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string", "messages")
        out.append({"role": m["role"], "content": content})
    return out


def token_text(llm: LLM, token_id: int) -> str:
    """How one token reads on its own (for logprobs)."""
    return llm.tokenizer.decode([token_id])

"""The input file of a batch job: one JSON request per line, split and checked without the model.

A problem with one line (not UTF-8, not JSON, nested too deep, text that is not valid Unicode,
no usable id) makes an error for that line only; a problem with the file (unreadable, a duplicate
id) is raised, before the model loads. A UTF-8 byte order mark at the start is skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layercake.errors import LayercakeError
from layercake.jobs.output import line_key
from layercake.jobs.requests import RequestError, check_unicode

BOM = b"\xef\xbb\xbf"


@dataclass
class Line:
    """One non-blank input line: its request (``body``) or why it has none (``error``)."""

    number: int  # 1-based
    key: str  # see ``line_key``
    id: Any  # the request's id; None when it has no usable one
    body: dict[str, Any] | None
    error: str | None = None


def read_lines(path: Path) -> list[Line]:
    """Every non-blank line of ``path``; raises LayercakeError for problems with the file."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise LayercakeError(f"cannot read input {path}: {e.strerror}") from None
    if data.startswith(BOM):
        data = data[len(BOM) :]
    lines, seen = [], {}
    for n, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        line = parse_line(n, raw)
        if line.id is not None:
            if line.key in seen:
                raise LayercakeError(
                    f"input line {n}: id {line.id!r} was already used on line {seen[line.key]}; "
                    "ids must be unique"
                )
            seen[line.key] = n
        lines.append(line)
    return lines


def parse_line(n: int, raw: bytes) -> Line:
    """Line ``n`` (bytes, without its newline) as a request or an error."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return _bad(n, f"line {n} is not UTF-8 (byte {e.start + 1} is {raw[e.start]:#04x})")
    try:
        body = json.loads(text)
    except RecursionError:
        return _bad(n, f"line {n} is not JSON this job reads: nested too deeply")
    except ValueError as e:
        return _bad(n, f"line {n} is not JSON: {e}")
    if not isinstance(body, dict):
        return _bad(n, f"line {n}: the line is not a JSON object")
    id_ = body.get("id")
    try:
        if id_ is None:
            raise RequestError("missing id")
        if isinstance(id_, bool) or not isinstance(id_, (str, int)):
            raise RequestError("id must be a string or an integer")
        check_unicode(id_, "id")
    except RequestError as e:
        return _bad(n, f"line {n}: {e}")
    try:
        check_unicode(body)
    except RequestError as e:
        return Line(n, line_key(id_, n), id_, None, f"line {n}: {e}")
    return Line(n, line_key(id_, n), id_, body)


def _bad(n: int, error: str) -> Line:
    return Line(n, line_key(None, n), None, None, error)

"""Opening model files safely: only regular files, never blocking, never reading without bound.

A path a model directory names (``model.safetensors``, ``config.json``, ``x.gguf``) may be a
directory, a FIFO or a device; opening a FIFO for reading blocks until a writer comes, and a device
can be read forever. Every reader opens through ``open_regular``, which refuses all of them in one
clear error, and reads small JSON files through ``read_json``, which bounds their size.
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any, BinaryIO

from layercake.errors import LayercakeError

MAX_JSON_BYTES = 64 * 2**20  # config, index and tokenizer_config files are far smaller

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """``path`` opened for binary reading; a clear error unless it is a regular file (symlinks
    to one are followed). Opened non-blocking so that a FIFO cannot stall the check."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise LayercakeError(f"{path}: not found") from None
    except OSError as e:
        raise LayercakeError(f"{path}: cannot be opened ({e.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise LayercakeError(f"{path}: is {kind}, not a model file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_json(path: str | os.PathLike, limit: int = MAX_JSON_BYTES) -> Any:
    """The JSON value in ``path`` (a regular file of at most ``limit`` bytes); one clear error
    for anything else, deep nesting included."""
    with open_regular(path) as f:
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise LayercakeError(f"{path}: larger than {limit} bytes; not a model's JSON file")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise LayercakeError(f"{path}: not valid JSON ({str(e)[:200]})") from None


def read_json_object(path: str | os.PathLike, limit: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """``read_json`` that must find a JSON object (what every config file holds)."""
    value = read_json(path, limit)
    if not isinstance(value, dict):
        raise LayercakeError(f"{path}: holds a JSON {type(value).__name__}, not an object")
    return value

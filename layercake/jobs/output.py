"""The results file of a batch job: appended one whole record (line) at a time, resumable.

Every record is one ``write`` and ``fsync``. A crash leaves at most a partial last line, which
the next run cuts off before it collects the keys already done; a write that fails (a full disk)
is cut back at once to the last whole record, so the file never ends mid-line while we run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from layercake.errors import LayercakeError


def line_key(id_: Any, line: int | None) -> str:
    """What identifies a request across runs: its id, or its line number when it has none."""
    return "id:" + json.dumps(id_) if id_ is not None else f"line:{line}"


def encode_record(row: dict[str, Any]) -> bytes:
    """One JSON line in UTF-8. Text that is not valid Unicode (a lone surrogate from an escape in
    the input) is written as JSON escapes, which read back to the same string."""
    try:
        return (json.dumps(row, ensure_ascii=False) + "\n").encode()
    except UnicodeEncodeError:
        return (json.dumps(row) + "\n").encode()


class Output:
    """The results file. Nothing is created until the first record: a job refused before any
    work leaves no file behind."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: set[str] = set()  # keys (see ``line_key``) of the lines already answered
        self.written = 0  # records written by this run
        self.fd: int | None = None
        if path.is_dir():
            raise LayercakeError(f"output {path} is a directory")
        if not path.parent.is_dir():
            raise LayercakeError(f"output directory {path.parent} does not exist")
        if path.exists():
            self._resume()
        if not os.access(path if path.exists() else path.parent, os.W_OK):
            raise LayercakeError(f"cannot write output {path}: permission denied")

    def _resume(self) -> None:
        try:
            data = self.path.read_bytes()
        except OSError as e:
            raise LayercakeError(f"cannot read output {self.path}: {e.strerror}") from None
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a line cut short by a crash: dropped, it will be redone
            try:
                os.truncate(self.path, end)
            except OSError as e:
                raise LayercakeError(f"cannot write output {self.path}: {e.strerror}") from None
        for n, raw in enumerate(data[:end].splitlines(), 1):
            try:
                row = json.loads(raw)
                self.done.add(line_key(row.get("id"), row.get("line")))
            except (ValueError, AttributeError, RecursionError):
                raise LayercakeError(
                    f"output {self.path} line {n} is not a result line of this job; "
                    "give another output path"
                ) from None

    def _open(self) -> int:
        if self.fd is None:
            try:
                self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            except OSError as e:
                raise LayercakeError(f"cannot write output {self.path}: {e.strerror}") from None
        return self.fd

    def write(self, row: dict[str, Any]) -> None:
        """Append one record durably, or raise LayercakeError with the file as it was before."""
        fd = self._open()
        data = encode_record(row)
        size = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:  # one write for a regular file; the loop only guards a short write
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError as e:
            self._cut(size)
            raise LayercakeError(
                f"cannot write output {self.path}: {e.strerror}; {self.written} results were "
                f"written this run, run the same command again to go on"
            ) from None
        self.written += 1

    def _cut(self, size: int) -> None:
        """Drop a partly written record (truncating frees space, so it works on a full disk)."""
        try:
            os.ftruncate(self.fd, size)
            os.fsync(self.fd)
        except OSError:
            pass  # the next run cuts the partial line off anyway

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

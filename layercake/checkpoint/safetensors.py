"""Hugging Face checkpoint directories: config.json + single or sharded safetensors.

The safetensors header is parsed here and tensors are views of a memory map, so a slice reads
only the bytes of the tensors it asks for, and a tensor already in the compute dtype is never
copied (the page cache holds it once).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import torch

from layercake.errors import LayercakeError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def release_pages(m: mmap.mmap, start: int, end: int) -> None:
    """Let the mapped pages [start, end) of ``m`` go (read back from the file if touched);
    ``start`` page-aligned. Pages an offload tier locked in RAM stay where they are."""
    try:
        m.madvise(mmap.MADV_DONTNEED, start, end - start)
    except OSError:  # EINVAL on locked pages
        pass


class SafetensorsFile:
    """One .safetensors file: header parsed and validated, data memory-mapped lazily."""

    def __init__(self, path: Path) -> None:
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise LayercakeError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100 * 2**20:
                raise LayercakeError(f"{path}: corrupt or truncated safetensors header")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise LayercakeError(f"{path}: corrupt safetensors header (not JSON)") from None
        header.pop("__metadata__", None)
        self.base = 8 + n
        self.entries: dict[str, dict[str, Any]] = header
        for name, e in header.items():
            if e.get("dtype") not in DTYPES:
                raise LayercakeError(
                    f"{path}: tensor {name} has unsupported dtype {e.get('dtype')}"
                )
            lo, hi = e["data_offsets"]
            if not 0 <= lo <= hi or self.base + hi > size:
                raise LayercakeError(
                    f"{path}: truncated or corrupt: tensor {name} needs bytes up to "
                    f"{self.base + hi}, the file has {size}"
                )
        self._map: mmap.mmap | None = None

    def nbytes(self, name: str) -> int:
        lo, hi = self.entries[name]["data_offsets"]
        return hi - lo

    def drop(self, name: str) -> None:
        """Tell the kernel the tensor's mapped pages are not needed now (after converting it):
        they leave this process's memory and would be read back from the file if touched."""
        if self._map is None:
            return
        lo, hi = self.entries[name]["data_offsets"]
        page = mmap.PAGESIZE
        start = (self.base + lo) // page * page
        release_pages(self._map, start, self.base + hi)

    def view(self, name: str) -> torch.Tensor:
        """The tensor as a zero-copy view of the memory map (copy-on-write, never written)."""
        e = self.entries[name]
        dtype, shape = DTYPES[e["dtype"]], e["shape"]
        lo, hi = e["data_offsets"]
        if hi == lo:
            return torch.empty(shape, dtype=dtype)
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        count = (hi - lo) // dtype.itemsize
        t = torch.frombuffer(self._map, dtype=dtype, count=count, offset=self.base + lo)
        return t.view(shape)


class SafetensorsCheckpoint:
    """An HF model directory; ``load`` reads one tensor by its HF name."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        cfg = self.dir / "config.json"
        if not cfg.is_file():
            raise LayercakeError(f"{self.dir}: no config.json (not a Hugging Face model directory)")
        try:
            self._config = json.loads(cfg.read_text())
        except json.JSONDecodeError as e:
            raise LayercakeError(f"{cfg}: not valid JSON ({e})") from None
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                other = [p.name for p in self.dir.glob("*.bin")] + [
                    p.name for p in self.dir.glob("*.pt")
                ]
                hint = (
                    f" (found {', '.join(other)}: only safetensors is supported)" if other else ""
                )
                raise LayercakeError(f"{self.dir}: no weights (*.safetensors){hint}")
            weight_map = {}
            for p in files:
                weight_map.update(dict.fromkeys(SafetensorsFile(p).entries, p.name))
        for fname in set(weight_map.values()):
            if not (self.dir / fname).is_file():
                raise LayercakeError(f"{self.dir}: the index names {fname}, which is missing")
        self.weight_map: dict[str, str] = weight_map
        self._files: dict[str, SafetensorsFile] = {}

    def config_dict(self) -> dict[str, Any]:
        return dict(self._config)

    def tensor_names(self) -> list[str]:
        return list(self.weight_map)

    def _file(self, name: str) -> SafetensorsFile:
        fname = self.weight_map[name]
        if fname not in self._files:  # opened only when one of its tensors is needed
            self._files[fname] = SafetensorsFile(self.dir / fname)
        f = self._files[fname]
        if name not in f.entries:
            raise LayercakeError(f"{f.path}: the index says it holds {name}, but it does not")
        return f

    def tensor_nbytes(self, name: str) -> int:
        return self._file(name).nbytes(name)

    def release(self, name: str) -> None:
        """The caller has its own copy of ``name``: let its mapped pages go."""
        self._file(name).drop(name)

    def stored_dtype(self, name: str) -> torch.dtype:
        return DTYPES[self._file(name).entries[name]["dtype"]]

    def load(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor in ``dtype``: the mapped bytes themselves when the dtype already matches,
        else a converted copy (and the mapped pages are released)."""
        f = self._file(name)
        t = f.view(name)
        if t.dtype == dtype:
            return t
        out = t.to(dtype)
        f.drop(name)
        return out

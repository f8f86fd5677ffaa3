"""Hugging Face checkpoint directories: config.json + single or sharded safetensors.

The safetensors header is parsed here and tensors are views of a memory map, so a slice reads
only the bytes of the tensors it asks for, and a tensor already in the compute dtype is never
copied (the page cache holds it once).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import torch

from layercake.checkpoint.experts import Part, expert_parts, model_names
from layercake.checkpoint.files import open_regular, read_json_object
from layercake.config import check_config, load_config
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


MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
MAX_DIMS = 8


class SafetensorsFile:
    """One .safetensors file: header parsed and validated, data memory-mapped lazily."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(8)
            if len(raw) < 8:
                raise LayercakeError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise LayercakeError(
                    f"{path}: truncated or not safetensors: the header claims {n} bytes, "
                    f"the file has {size}"
                )
            if n > MAX_HEADER_BYTES:
                raise LayercakeError(f"{path}: safetensors header of {n} bytes (at most 100 MiB)")
            try:
                header = json.loads(f.read(n))
            except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
                raise LayercakeError(f"{path}: corrupt safetensors header (not JSON)") from None
        if not isinstance(header, dict):
            raise LayercakeError(
                f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, "
                "not an object)"
            )
        if not isinstance(header.pop("__metadata__", None), (dict, type(None))):
            raise LayercakeError(f"{path}: corrupt safetensors header (__metadata__ not an object)")
        self.base = 8 + n
        self.entries: dict[str, dict[str, Any]] = header
        for name, e in header.items():
            _check_entry(path, name, e, size - self.base)
        self._map: mmap.mmap | None = None

    def nbytes(self, name: str) -> int:
        lo, hi = self.entries[name]["data_offsets"]
        return hi - lo

    def drop(self, name: str, rows: tuple[int, int] | None = None) -> None:
        """Tell the kernel the tensor's mapped pages (of its ``rows`` only, if given) are not
        needed now (after converting it): they leave this process's memory and would be read
        back from the file if touched."""
        if self._map is None:
            return
        lo, hi = self.entries[name]["data_offsets"]
        if rows is not None:
            row = self.nbytes(name) // max(1, _rows(self.entries[name]["shape"]))
            lo, hi = lo + rows[0] * row, lo + rows[1] * row
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
            with open_regular(self.path) as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        count = (hi - lo) // dtype.itemsize
        t = torch.frombuffer(self._map, dtype=dtype, count=count, offset=self.base + lo)
        if (self.base + lo) % dtype.itemsize:  # a header not padded: kernels want aligned data
            t = t.clone()
        return t.view(shape)


def _rows(shape: list[int]) -> int:
    """Rows of a tensor seen as 2-D (rows, last dim)."""
    return math.prod(shape[:-1]) if shape else 1


def _check_entry(path: Path, name: str, e: Any, data_size: int) -> None:
    """One header entry: a known dtype, a shape of non-negative whole numbers, and offsets
    inside the data that hold exactly shape x dtype bytes."""

    def bad(why: str) -> LayercakeError:
        return LayercakeError(f"{path}: corrupt safetensors header: tensor {name!r} {why}")

    if not isinstance(e, dict):
        raise bad(f"is described by a JSON {type(e).__name__}, not an object")
    dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise bad(f"has dtype {dtype!r} (supported: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise bad(f"has shape {shape!r}: not a list of at most {MAX_DIMS} sizes")
    if any(type(d) is not int or d < 0 for d in shape):
        raise bad(f"has shape {shape!r}: sizes must be whole numbers >= 0")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or any(type(o) is not int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise bad(f"has data_offsets {offsets!r}: not [begin, end] with 0 <= begin <= end")
    lo, hi = offsets
    if hi > data_size:
        raise bad(f"needs data bytes up to {hi}, the file has {data_size}: truncated or corrupt")
    need = math.prod(shape) * DTYPES[dtype].itemsize
    if hi - lo != need:
        raise bad(f"of shape {shape} {dtype} needs {need} bytes, its offsets span {hi - lo}")


class SafetensorsCheckpoint:
    """An HF model directory; ``load`` reads one tensor by its HF name."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        cfg = self.dir / "config.json"
        if not os.path.lexists(cfg):
            raise LayercakeError(f"{self.dir}: no config.json (not a Hugging Face model directory)")
        self._config = read_json_object(cfg)
        check_config(self._config, str(cfg))
        index = self.dir / "model.safetensors.index.json"
        if os.path.lexists(index):
            weight_map = _weight_map(index)
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
        self.weight_map: dict[str, str] = weight_map  # stored tensor -> file
        # model tensors stored under another name or stacked with other experts
        self.parts: dict[str, Part] = expert_parts(self._config, weight_map)
        self._files: dict[str, SafetensorsFile] = {}
        load_config(self._config, str(cfg))  # complete and buildable, said with the file named

    def config_dict(self) -> dict[str, Any]:
        return dict(self._config)

    def tensor_names(self) -> list[str]:
        return model_names(self.weight_map, self.parts)

    def _part(self, name: str) -> tuple[SafetensorsFile, str, tuple[int, int] | None]:
        """(file, stored tensor, its rows or None for all) that hold model tensor ``name``."""
        part = self.parts.get(name)
        if part is None:
            return self._file(name), name, None
        f = self._file(part.src)
        return f, part.src, part.rows(tuple(f.entries[part.src]["shape"]))

    def _file(self, name: str) -> SafetensorsFile:
        fname = self.weight_map[name]
        if fname not in self._files:  # opened only when one of its tensors is needed
            self._files[fname] = SafetensorsFile(self.dir / fname)
        f = self._files[fname]
        if name not in f.entries:
            raise LayercakeError(f"{f.path}: the index says it holds {name}, but it does not")
        return f

    def tensor_nbytes(self, name: str) -> int:
        f, src, rows = self._part(name)
        if rows is None:
            return f.nbytes(src)
        return f.nbytes(src) // _rows(f.entries[src]["shape"]) * (rows[1] - rows[0])

    def release(self, name: str) -> None:
        """The caller has its own copy of ``name``: let its mapped pages go."""
        f, src, rows = self._part(name)
        f.drop(src, rows)

    def stored_dtype(self, name: str) -> torch.dtype:
        f, src, _ = self._part(name)
        return DTYPES[f.entries[src]["dtype"]]

    def load(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor in ``dtype``: the mapped bytes themselves when the dtype already matches,
        else a converted copy (and the mapped pages are released). An expert stored stacked
        with others is its own rows of the stacked tensor: only they are read."""
        f, src, rows = self._part(name)
        t = f.view(src)
        if rows is not None:
            t = t.reshape(-1, t.shape[-1])[rows[0] : rows[1]]
        if t.dtype == dtype:
            return t
        out = t.to(dtype)
        f.drop(src, rows)
        return out


def _weight_map(index: Path) -> dict[str, str]:
    """The tensor -> file map of a sharded checkpoint's index; files must be plain names in the
    model directory (an index cannot send the reader elsewhere)."""
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise LayercakeError(f"{index}: 'weight_map' is missing or not an object")
    for name, fname in weight_map.items():
        if not isinstance(fname, str) or fname in ("", ".", "..") or Path(fname).name != fname:
            raise LayercakeError(
                f"{index}: tensor {name!r} is in {fname!r}, not a file name in this directory"
            )
    for fname in set(weight_map.values()):
        if not os.path.lexists(index.parent / fname):
            raise LayercakeError(f"{index}: names {fname}, which is missing")
    return weight_map

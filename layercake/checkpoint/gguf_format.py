"""The GGUF file format: the header parsed into plain Python values and tensor infos.

Parsed here rather than by `gguf.GGUFReader`, which builds numpy objects for every string of every
array (SmolLM2's 98k vocabulary strings and merges: ~5 s and ~180 MB); this parser reads them
straight into Python lists with bounds-checked reads, so every way a file can be wrong becomes one
clear `LayercakeError`. The tensor data stays in the memory-mapped file.
"""

import math
import mmap
import struct
from pathlib import Path
from typing import NamedTuple

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QType
from gguf import GGUFValueType

from layercake.checkpoint.files import open_regular
from layercake.errors import LayercakeError


class TensorInfo(NamedTuple):
    """One tensor info of the header; `shape` in ggml order (fastest-varying dimension first)."""

    name: str
    tensor_type: QType
    shape: tuple[int, ...]
    n_elements: int
    n_bytes: int
    data_offset: int  # from the start of the file


def open_gguf(path: Path) -> tuple[mmap.mmap, dict, dict[str, TensorInfo]]:
    """Map the file and parse its header, turning every way it can be wrong into one clear error.

    Returns the read-only map, the metadata as plain Python values, and the tensors by GGUF name.
    """
    with open_regular(path) as f:
        if f.read(4) != b"GGUF":
            raise LayercakeError(f"{path} is not a GGUF file (it does not start with b'GGUF').")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    parser = _HeaderParser(buf)
    try:
        metadata, tensors = parser.parse()
    except _Truncated:
        raise LayercakeError(
            f"{path} is truncated: the file ends ({len(buf)} bytes) inside {parser.where}."
        ) from None
    except (_Corrupt, UnicodeDecodeError) as e:
        raise LayercakeError(f"{path} is a corrupt GGUF file ({parser.where}: {e}).") from None
    except _Unsupported as e:
        raise LayercakeError(f"{path} is {e}, which layercake cannot read.") from None
    for t in tensors.values():
        if t.data_offset + t.n_bytes > len(buf):
            raise LayercakeError(f"{path} is truncated: tensor {t.name!r} runs past the end.")
    return buf, metadata, tensors


class _Truncated(Exception):
    """A read ran past the end of the file."""


class _Corrupt(Exception):
    """The header holds something no GGUF writer produces."""


class _Unsupported(Exception):
    """A valid GGUF of a kind this parser does not read."""


_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
# Fixed-size metadata value types -> their little-endian struct format (also a numpy dtype).
_SCALARS = {
    t: struct.Struct(f)
    for t, f in (
        (GGUFValueType.UINT8, "<B"), (GGUFValueType.INT8, "<b"), (GGUFValueType.UINT16, "<H"),
        (GGUFValueType.INT16, "<h"), (GGUFValueType.UINT32, "<I"), (GGUFValueType.INT32, "<i"),
        (GGUFValueType.FLOAT32, "<f"), (GGUFValueType.BOOL, "<?"), (GGUFValueType.UINT64, "<Q"),
        (GGUFValueType.INT64, "<q"), (GGUFValueType.FLOAT64, "<d"),
    )
}  # fmt: skip
_MAX_DIMS = 4  # GGML_MAX_DIMS: llama.cpp refuses more
_MAX_NESTING = 8  # arrays of arrays: gguf-py writes them, llama.cpp none; bounds the recursion


class _HeaderParser:
    """GGUF v2/v3 header -> (metadata, tensors), by bounds-checked little-endian reads of `buf`.

    `where` names what is being read, for error messages.
    """

    def __init__(self, buf: mmap.mmap):
        self.buf, self.off, self.where = buf, 0, "the header"

    def parse(self) -> tuple[dict, dict[str, TensorInfo]]:
        self._take(4)  # the magic, checked by the caller
        version = self._u32()
        if version & 0xFFFF == 0:  # how a big-endian file's version reads
            raise _Unsupported("a big-endian GGUF (only little-endian files are read)")
        if version not in (2, 3):  # version 1 had 32-bit counts and lengths
            raise _Unsupported(f"GGUF version {version} (versions 2 and 3 are read)")
        n_tensors, n_kv = self._u64(), self._u64()
        metadata = {}
        for i in range(n_kv):
            self.where = f"metadata entry {i}"
            key = self._string()
            self.where = f"metadata {key!r}"
            if key in metadata:
                raise _Corrupt("the key appears twice")
            metadata[key] = self._value(self._u32())
        infos = []
        for i in range(n_tensors):
            self.where = f"tensor info {i}"
            name = self._string()
            self.where = f"tensor info {name!r}"
            if (n_dims := self._u32()) > _MAX_DIMS:
                raise _Corrupt(f"{n_dims} dimensions (at most {_MAX_DIMS})")
            dims = tuple(self._u64() for _ in range(n_dims))
            infos.append((name, dims, self._u32(), self._u64()))
        self.where = "general.alignment"
        alignment = metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
        if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
            raise _Corrupt(f"alignment {alignment!r} is not a power of two")
        data_start = -(-self.off // alignment) * alignment  # the data section is aligned too
        tensors = {}
        for name, dims, raw_type, offset in infos:
            self.where = f"tensor info {name!r}"
            if name in tensors:
                raise _Corrupt("the tensor name appears twice")
            try:
                qtype = QType(raw_type)
            except ValueError:
                raise _Corrupt(f"unknown ggml type {raw_type}") from None
            block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
            if (row := dims[0] if dims else 1) % block_size:
                raise _Corrupt(f"rows of {row} values are not whole {qtype.name} blocks")
            if offset % alignment:
                raise _Corrupt(f"data offset {offset} is not a multiple of the alignment")
            n = math.prod(dims)
            tensors[name] = TensorInfo(
                name, qtype, dims, n, n // block_size * type_size, data_start + offset
            )
        return metadata, tensors

    def _take(self, n: int) -> int:
        """Step over `n` bytes; where they start."""
        start = self.off
        if n > len(self.buf) - start:
            raise _Truncated
        self.off = start + n
        return start

    def _u32(self) -> int:
        return _U32.unpack_from(self.buf, self._take(4))[0]

    def _u64(self) -> int:
        return _U64.unpack_from(self.buf, self._take(8))[0]

    def _string(self) -> str:
        n = self._u64()
        start = self._take(n)
        return str(self.buf[start : start + n], "utf-8")

    def _value(self, vtype: int):
        """One metadata value as plain Python; float32 scalars as their shortest repr (1e-05)."""
        if (fmt := _SCALARS.get(vtype)) is not None:
            value = fmt.unpack_from(self.buf, self._take(fmt.size))[0]
            return float(str(np.float32(value))) if vtype == GGUFValueType.FLOAT32 else value
        if vtype == GGUFValueType.STRING:
            return self._string()
        if vtype == GGUFValueType.ARRAY:
            return self._array(self._u32(), self._u64())
        raise _Corrupt(f"unknown value type {vtype}")

    def _array(self, vtype: int, n: int, depth: int = 0) -> list:
        if (fmt := _SCALARS.get(vtype)) is not None:  # one numpy read, not n struct calls
            start = self._take(n * fmt.size)
            return np.frombuffer(self.buf, fmt.format, n, start).tolist() if n else []
        if vtype == GGUFValueType.STRING:
            return self._strings(n)
        if vtype == GGUFValueType.ARRAY:  # each element: its own type (u32) and length (u64)
            if depth >= _MAX_NESTING:
                raise _Corrupt(f"arrays nested more than {_MAX_NESTING} deep")
            if n * 12 > len(self.buf) - self.off:
                raise _Truncated
            return [self._array(self._u32(), self._u64(), depth + 1) for _ in range(n)]
        raise _Corrupt(f"unknown array element type {vtype}")

    def _strings(self, n: int) -> list[str]:
        """`n` length-prefixed strings. Vocabularies and merges hold ~100k each, so this loop is
        kept to one unpack, one bounds check, one slice and one decode per string."""
        buf, off, end = self.buf, self.off, len(self.buf)
        if n * 8 > end - off:  # each string takes its 8-byte length at least
            raise _Truncated
        unpack, out = _U64.unpack_from, []
        append = out.append
        try:
            for _ in range(n):
                size = unpack(buf, off)[0]
                off += 8
                if size > end - off:  # slicing past the end would not fail, just come up short
                    raise _Truncated
                append(str(buf[off : off + size], "utf-8"))
                off += size
        except struct.error:  # a length read past the end
            raise _Truncated from None
        self.off = off
        return out

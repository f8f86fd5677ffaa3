"""Streamed units and their disk layout.

A unit is what the executor loads at once: one decoder layer, or a slab of rows of the output
head (the head of a large-vocabulary model is as big as several layers; slabs keep every load
about a layer's size). ``prepare`` writes each unit once to its own file in ``offload_dir``, in
the storage dtype (or, compressed, in the quantized row layout of ``layercake.quant``: a row's
values, two 4-bit ones to a byte, scales and zeros side by side, so row ranges stay byte
ranges), every tensor at a 4 KiB-aligned offset so that any row range can be read with one large
direct read; the compression mode is part of each entry, hence of the layout's hash, so a bf16
and an int4 layout of one model coexist. A manifest written last marks the set complete and is
reused next time. Fused linears (``fusion``: q/k/v, gate/up) are one tensor of the layout, their
members' rows side by side.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from layercake.checkpoint.quantized import load_rows, quant_spec, weight_quant
from layercake.errors import LayercakeError
from layercake.offload.fusion import fuse_linears, module_name
from layercake.offload.tiers import ALIGN, align_up, check_writable
from layercake.ops.int4pack import TILE_N as INT4PACK_ROWS
from layercake.ops.int4pack import data_shape, pack, sz_shape
from layercake.ops.linear import choose
from layercake.progress import track
from layercake.quant import Compression, QTensor, QuantSpec

FORMAT = 1


@dataclass(frozen=True)
class Entry:
    """One tensor of a unit: ``param`` the model's name (or ``lm_head.weight``), ``src`` the
    checkpoint's, rows [row0, row0 + shape[0]) of it, at ``offset`` in the unit's file; a fused
    weight's rows are those of ``members`` ((checkpoint tensor, rows), in order) side by side."""

    param: str
    src: str
    shape: tuple[int, ...]
    dtype: str
    row0: int
    offset: int
    quant: str = ""  # "" plain; "int4-g64" or a GGUF quant type: the quantized row layout
    piece: str = ""  # "data" / "sz": one of the two tensors of the ``int4pack`` form
    members: tuple[tuple[str, int], ...] = ()

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def spec(self) -> QuantSpec | None:
        return quant_spec(self.quant) if self.quant else None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def sources(self) -> tuple[str, ...]:
        """The checkpoint tensors this entry's rows come from."""
        return tuple(src for src, _ in self.members) or (self.src,)

    @property
    def weight_shape(self) -> tuple[int, int]:
        """An int4pack piece's weight (out, in); ``shape`` is that of the piece itself."""
        if self.piece == "data":
            return self.shape[0] * INT4PACK_ROWS, self.shape[1] * 2 // INT4PACK_ROWS
        return self.shape[0], self.shape[1] // 2 * self.spec.group_size

    @property
    def row_bytes(self) -> int:
        if self.quant and not self.piece:
            return self.spec.row_bytes(self.shape[-1])
        n = self.torch_dtype.itemsize
        for s in self.shape[1:]:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.row_bytes


@dataclass(frozen=True)
class Unit:
    name: str  # "layer.3", "layer.3.expert.7" or "head.0"
    kind: str  # "layer" | "expert" (a routed expert of layer ``index``) | "head"
    index: int  # layer index, or first vocabulary row of a head slab
    entries: tuple[Entry, ...]

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    @property
    def file_bytes(self) -> int:
        last = self.entries[-1]
        return align_up(last.offset + last.nbytes)


def storage_dtype(ckpt: Any, src: str, compute: torch.dtype) -> torch.dtype:
    """Tensors keep their stored float dtype; quantized ones (GGUF) are stored dequantized in the
    compute dtype, exactly."""
    stored = ckpt.stored_dtype(src)
    return stored if stored is not None and stored.is_floating_point else compute


def plan_units(
    ckpt: Any,
    model: torch.nn.Module,
    layers: tuple[int, ...],
    head: bool,
    compute: torch.dtype,
    compress: Compression | None = None,
    int4pack: bool = False,
) -> list[Unit]:
    """Units in execution order: the held layers, then head slabs of about a layer's bytes.
    The layers' fusable linears of ``model`` (on meta) are fused first (``fusion``). With
    ``compress.weight``, matrices are held quantized in every tier; with ``int4pack`` (CPU
    compute), the int4 ones the kernel takes in its ``int4pack`` form: two pieces, the values
    (rows of ``INT4PACK_ROWS`` output rows) and the scales and zeros (rows), each placed like any
    tensor."""
    compress = compress if compress is not None and compress.weight is not None else None
    names = set(ckpt.tensor_names())
    fused = fuse_linears(ckpt, model, layers, compute, compress)

    def src_of(param: str) -> str:
        src = model.source_name(param, names)
        if src not in names:
            raise LayercakeError(f"checkpoint has no tensor {param!r}")
        return src

    def entries(params: list[tuple[str, tuple[int, ...], int]]) -> tuple[Entry, ...]:
        out, offset = [], 0
        for param, shape, row0 in params:
            members = tuple((src_of(m), rows) for m, rows in fused.get(param, ()))
            src = members[0][0] if members else src_of(param)
            if compress is not None and len(shape) == 2:
                head = param == "lm_head.weight"
                quant = weight_quant(ckpt, src, compress, shape[1], head)
                spec = quant_spec(quant)
                form = choose(shape, stored=None, spec=spec, device="cpu", dtype=compute,
                              streamed=True)  # fmt: skip
                if int4pack and form == "int4pack":
                    part = [Entry(param, src, data_shape(shape), "uint8", row0, 0, quant, "data",
                                  members),
                            Entry(f"{param}#sz", src, sz_shape(shape, spec), "bfloat16", row0, 0,
                                  quant, "sz", members)]  # fmt: skip
                else:
                    part = [Entry(param, src, shape, "uint8", row0, 0, quant, "", members)]
            else:
                dt = str(storage_dtype(ckpt, src, compute)).removeprefix("torch.")
                part = [Entry(param, src, shape, dt, row0, 0, "", "", members)]
            for e in part:
                out.append(replace(e, offset=offset))
                offset = align_up(offset + e.nbytes)
        return tuple(out)

    units = []
    for i in layers:
        layer = model.layers()[str(i)]
        params = [
            (f"{module_name(model, layer)}.{n}", tuple(p.shape), 0)
            for n, p in layer.named_parameters()
        ]
        groups = expert_groups(params)  # routed experts: a unit each (``offload.experts``)
        rest = [x for x in params if expert_of(x[0]) is None]
        units.append(Unit(f"layer.{i}", "layer", i, entries(rest)))
        units += [Unit(f"layer.{i}.expert.{e}", "expert", i, entries(g)) for e, g in groups]
    if head:
        w = model.get_submodule("lm_head").weight
        vocab, width = w.shape
        layer_bytes = max((u.nbytes for u in units), default=64 * 2**20)
        (probe,) = entries([("lm_head.weight", (1, width), 0)])
        rows = max(1, min(vocab, layer_bytes // probe.row_bytes))
        if int4pack and rows > INT4PACK_ROWS:  # slabs of whole int4pack row ranges
            rows = rows // INT4PACK_ROWS * INT4PACK_ROWS
        for r0 in range(0, vocab, rows):
            n = min(rows, vocab - r0)
            units.append(
                Unit(f"head.{r0}", "head", r0, entries([("lm_head.weight", (n, width), r0)]))
            )
    return units


def expert_of(param: str) -> int | None:
    """The routed expert a parameter belongs to (``...mlp.experts.E.*``), else None."""
    head, sep, tail = param.partition(".experts.")
    e = tail.partition(".")[0]
    return int(e) if sep and e.isdigit() else None


def expert_groups(params: list) -> list[tuple[int, list]]:
    """A layer's (name, ...) params grouped by routed expert, in expert order."""
    groups: dict[int, list] = {}
    for x in params:
        e = expert_of(x[0])
        if e is not None:
            groups.setdefault(e, []).append(x)
    return sorted(groups.items())


def prepare(ckpt: Any, units: list[Unit], source: Path, offload_dir: Path) -> Path:
    """Write each unit's file once (or find them written) and return their directory."""
    key = json.dumps(
        {"format": FORMAT, "source": _identity(source), "units": [asdict(u) for u in units]},
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    out = offload_dir / f"{source.name}-{digest}"
    manifest = out / "manifest.json"
    if manifest.is_file() and _complete(out, units):
        return out
    check_writable(offload_dir, sum(u.file_bytes for u in units))
    out.mkdir(parents=True, exist_ok=True)
    for u in track(units, f"writing the offload layout {out}", lambda u: u.file_bytes, "B"):
        _write_unit(ckpt, u, out / f"{u.name}.bin")
    tmp = out / "manifest.json.tmp"
    tmp.write_text(key)
    os.replace(tmp, manifest)
    return out


def _complete(out: Path, units: list[Unit]) -> bool:
    return all(
        (out / f"{u.name}.bin").is_file() and (out / f"{u.name}.bin").stat().st_size == u.file_bytes
        for u in units
    )


def _identity(source: Path) -> list:
    files = [source] if source.is_file() else sorted(p for p in source.iterdir() if p.is_file())
    return [
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in files
        if p.suffix in (".safetensors", ".gguf", ".json")
    ]


def _write_unit(ckpt: Any, u: Unit, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    try:
        with open(tmp, "wb") as f:
            for e in u.entries:
                t = int4pack_piece(ckpt, e) if e.piece else entry_rows(ckpt, e)
                f.seek(e.offset)
                f.write(t.contiguous().view(torch.uint8).numpy().tobytes())
            f.truncate(u.file_bytes)
            f.flush()
            os.fsync(f.fileno())
            if hasattr(os, "posix_fadvise"):  # written once, read with direct I/O: drop it
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise LayercakeError(f"writing offload file {path}: {e.strerror}") from e
    finally:
        for e in u.entries:
            for src in e.sources:
                ckpt.release(src)


def entry_rows(ckpt: Any, e: Entry, n: int | None = None) -> torch.Tensor:
    """The first ``n`` (default: all) rows of a plain or quantized entry as stored in the layout:
    a view of the checkpoint where it holds them so, a fused entry's members side by side (only
    the members' pages that hold those rows are read)."""
    n = e.shape[0] if n is None else n
    if not e.members:
        if e.quant:
            return load_rows(ckpt, e.src, e.quant, e.row0, n)
        return ckpt.load(e.src, e.torch_dtype)[e.row0 : e.row0 + n]
    parts, left = [], n
    for src, rows in e.members:
        t = load_rows(ckpt, src, e.quant) if e.quant else ckpt.load(src, e.torch_dtype)
        if tuple(t.shape[:1]) != (rows,):
            raise LayercakeError(f"tensor {src!r} does not have the {rows} rows config says")
        parts.append(t[: max(0, left)])
        left -= rows
    return torch.cat(parts)


_last_int4pack: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}


def int4pack_piece(ckpt: Any, e: Entry) -> torch.Tensor:
    """An int4pack piece (``e.piece`` of the weight's rows), made from the row layout; the
    two pieces of one weight come in a row, so the other one is kept for its turn."""
    key = (e.src, e.row0)
    if key not in _last_int4pack:
        _last_int4pack.clear()
        shape = e.weight_shape
        rows = entry_rows(ckpt, replace(e, shape=shape, piece=""), shape[0])
        _last_int4pack[key] = pack(QTensor.from_rows(rows, shape, e.spec))
    data, sz = _last_int4pack[key]
    if e.piece == "sz":
        del _last_int4pack[key]
    return data if e.piece == "data" else sz


def disk_range(u: Unit, first_row: dict[str, int]) -> tuple[int, int]:
    """The aligned byte range of ``u``'s file holding every row from ``first_row[param]`` on
    (the rows placed on disk), as (offset, length)."""
    start = None
    for e in u.entries:
        r = first_row[e.param]
        if r < e.shape[0]:
            start = e.offset + r * e.row_bytes
            break
    if start is None:
        return 0, 0
    start = start // ALIGN * ALIGN
    return start, u.file_bytes - start

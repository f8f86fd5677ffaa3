"""Build a model slice: the family's modules on the meta device, then each parameter assigned
from the checkpoint (only the tensors the slice holds are read) and each linear weight held in
the form ``ops.linear.choose`` picks. Linears a family fuses (q/k/v, gate/up: ``Model.fused``)
are built as one weight from their checkpoint tensors side by side."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from layercake.checkpoint import Checkpoint
from layercake.checkpoint.quantized import load_rows, quant_spec, weight_quant
from layercake.config import BaseConfig, load_config
from layercake.errors import LayercakeError
from layercake.models import family
from layercake.models.base import DecoderSlice
from layercake.models.layers import Embedding
from layercake.models.parts import Parts, parse_parts
from layercake.ops import linear as ops
from layercake.ops.mkl import SLAB_BYTES
from layercake.quant import GGUF_BLOCKS, SLAB_ELEMENTS, Compression, QuantSpec, Workspace


@dataclass
class _Linear:
    """One linear weight of the slice: where it comes from and the form it will take."""

    name: str  # the module's name in the slice
    src: str  # the checkpoint's tensor
    shape: tuple[int, int]
    form: str
    quant: str  # "" (float) or the held quantized form (``checkpoint.quantized``)
    stored: torch.dtype | None


def build_slice(
    ckpt: Checkpoint,
    parts: str | Parts = "f",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    config: BaseConfig | None = None,
    *,
    compiled: bool = False,
    compress: Compression | None = None,
    fast: bool = False,
    fuse: bool = True,
) -> DecoderSlice:
    """The slice ``parts`` of the checkpoint's model, resident on ``device``.

    A tensor already in ``dtype`` on the CPU stays a view of the checkpoint's memory map:
    weights are never held twice. ``compress.weight``: linear weights held quantized;
    ``fast``: GGUF Q4_0 / Q4_1 / Q8_0 weights kept as blocks for our kernel (and bf16 ones
    multiplied as stored); ``compiled``: the step will be compiled (plain weights where the
    weights are float). ``fuse``: q/k/v and gate/up become one weight each."""
    config = config or load_config(ckpt.config_dict())
    if isinstance(parts, str):
        parts = parse_parts(parts, config.num_hidden_layers)
    fam = family(config.model_type)
    with torch.device("meta"):
        model = fam.Model(config, parts)
    compress = compress if compress is not None and compress.weight is not None else None
    names = set(ckpt.tensor_names())
    linears: dict[str, _Linear] = {}
    state: dict[str, torch.Tensor] = {}
    loaded: dict[tuple[str, torch.dtype], torch.Tensor] = {}
    for name, p in model.named_parameters():
        src = fam.Model.source_name(name, names) if config.tie_word_embeddings else name
        if src not in names:
            raise LayercakeError(f"checkpoint has no tensor {name!r} (needed by part {parts})")
        owner_name, _, pname = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if type(owner) is nn.Linear and pname == "weight":
            lin = _plan(ckpt, owner_name, src, tuple(p.shape), device, dtype, compiled,
                        compress, fast)  # fmt: skip
            if lin.form != "dense":
                linears[owner_name] = lin
                continue
        want = embedding_dtype(ckpt, src, dtype, device) if isinstance(owner, Embedding) else dtype
        if want != dtype:
            owner.compute_dtype = dtype
        if (src, want) not in loaded:
            loaded[src, want] = check_shape(ckpt.load(src, want), src, tuple(p.shape)).to(device)
        state[name] = loaded[src, want]
    model.load_state_dict(state, assign=True, strict=not linears)
    groups = _fusions(model, linears) if fuse else []
    _Maker(ckpt, linears, loaded, device, dtype).run(model, groups)
    model.requires_grad_(False)
    return model.eval()


def _plan(
    ckpt: Checkpoint, name: str, src: str, shape: tuple[int, int], device: torch.device | str,
    dtype: torch.dtype, compiled: bool, compress: Compression | None, fast: bool,
) -> _Linear:  # fmt: skip
    stored = ckpt.stored_dtype(src)
    quant = ""
    if compress is not None:
        quant = weight_quant(ckpt, src, compress, shape[1], head=name == "lm_head")
    elif fast and hasattr(ckpt, "block_type") and ckpt.block_type(src) in GGUF_BLOCKS:
        quant = ckpt.block_type(src)
    spec = quant_spec(quant) if quant else None
    kw = dict(stored=stored, device=device, dtype=dtype, compiled=compiled, fast=fast)
    form = ops.choose(shape, spec=spec, **kw)
    if quant and compress is None and form != "blocks":  # native blocks only for our kernel
        quant, form = "", ops.choose(shape, spec=None, **kw)
    return _Linear(name, src, shape, form, quant, stored)


def _fusions(model: nn.Module, linears: dict[str, _Linear]) -> list[tuple[str, list[str]]]:
    """(fused module name, member names) for each group of ``Model.fused`` whose members are
    all held in one form, one quantized form and one storage (else they stay apart)."""
    out = []
    for parent, _ in model.named_modules():
        for fused, members in getattr(type(model), "fused", {}).items():
            names = [f"{parent}.{m}" if parent else m for m in members]
            if not all(n in linears for n in names):
                continue
            kinds = {(linears[n].form, linears[n].quant, linears[n].stored) for n in names}
            if len(kinds) == 1 and linears[names[0]].form != "dequant":
                out.append((f"{parent}.{fused}" if parent else fused, names))
    return out


class _Maker:
    """Makes each planned linear (alone or fused) in its form and puts it in the model."""

    def __init__(
        self,
        ckpt: Checkpoint,
        linears: dict[str, _Linear],
        loaded: dict[tuple[str, torch.dtype], torch.Tensor],
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        self.ckpt, self.linears, self.loaded = ckpt, linears, loaded
        self.device, self.dtype = device, dtype
        self.scratch: torch.Tensor | None = None
        self.workspace: Workspace | None = None

    def run(self, model: nn.Module, groups: list[tuple[str, list[str]]]) -> None:
        done = set()
        for fused, members in groups:
            self._put(model, fused, members, drop=members)
            done.update(members)
        for name in self.linears:
            if name not in done:
                self._put(model, name, [name])

    def _put(
        self, model: nn.Module, name: str, members: list[str], drop: tuple | list = ()
    ) -> None:
        lins = [self.linears[m] for m in members]
        biases = [model.get_submodule(m).bias for m in members]
        weight = self._weight(lins)
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([
                b.detach().float() if b is not None else torch.zeros(lin.shape[0])
                for b, lin in zip(biases, lins)
            ])  # fmt: skip
        for m in drop:
            parent, _, child = m.rpartition(".")
            delattr(model.get_submodule(parent) if parent else model, child)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, ops.Linear(weight, bias))
        for lin in lins:
            self.ckpt.release(lin.src)

    def _weight(self, lins: list[_Linear]) -> object:
        first, n = lins[0], sum(lin.shape[0] for lin in lins)
        shape = (n, first.shape[1])
        if first.quant:
            spec = quant_spec(first.quant)
            rows = [self._rows(lin, spec) for lin in lins]
            rows = rows[0] if len(rows) == 1 else torch.cat(rows)
            if first.form == "dequant" and self.workspace is None:
                need = min(SLAB_ELEMENTS, max(lin.shape[0] * lin.shape[1] for lin in
                                               self.linears.values()))  # fmt: skip
                self.workspace = Workspace(need, self.dtype, self.device)
            return ops.from_rows(first.form, rows, shape, spec, self.device, self.workspace)
        sources = [self._float(lin) for lin in lins]
        source = sources[0] if len(sources) == 1 else torch.cat(sources)
        if first.form == "mkl" and self.scratch is None:
            self.scratch = torch.empty(SLAB_BYTES // 4)
        return ops.from_float(first.form, source, self.scratch)

    def _rows(self, lin: _Linear, spec: QuantSpec) -> torch.Tensor:
        rows = load_rows(self.ckpt, lin.src, lin.quant)
        if tuple(rows.shape) != (lin.shape[0], spec.row_bytes(lin.shape[1])):
            raise LayercakeError(
                f"tensor {lin.src!r} does not have the shape {lin.shape} config says"
            )
        return rows

    def _float(self, lin: _Linear) -> torch.Tensor:
        source = self.loaded.get((lin.src, torch.float32))  # a tied head: the embedding's
        if source is None:  # as stored: a view of the file where it can be
            source = self.ckpt.load(lin.src, lin.stored or torch.float32)
        return check_shape(source, lin.src, lin.shape)


def check_shape(t: torch.Tensor, src: str, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(t.shape) != tuple(shape):
        raise LayercakeError(
            f"tensor {src!r} has shape {tuple(t.shape)}, config says {tuple(shape)}"
        )
    return t


def embedding_dtype(
    ckpt: Checkpoint, name: str, dtype: torch.dtype, device: torch.device | str
) -> torch.dtype:
    """An embedding table stored narrower than the compute dtype (bf16/fp16 for fp32) stays a
    view of the checkpoint on the CPU: rows are upcast on lookup, exactly, and the table (often
    the biggest tensor) is neither converted nor held twice."""
    stored = ckpt.stored_dtype(name)
    narrower = stored is not None and stored.is_floating_point and stored.itemsize < dtype.itemsize
    return stored if narrower and torch.device(device).type == "cpu" else dtype

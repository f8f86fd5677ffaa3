"""Open a checkpoint (HF directory or GGUF file) and build model slices from it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from layercake.checkpoint.quantized import load_rows, quant_spec, weight_quant
from layercake.config import BaseConfig, load_config
from layercake.errors import LayercakeError
from layercake.models import family
from layercake.models.base import DecoderSlice
from layercake.models.layers import Embedding
from layercake.models.parts import Parts, parse_parts
from layercake.ops.blocks import Blocks
from layercake.ops.blocks import takes as blocks_ok
from layercake.ops.int4pack import Int4Linear, PackedInt4, PackedInt8, kernel8_ok, kernel_ok, pack
from layercake.ops.mkl import BLOCK_BYTES, PackedLinear, packing_available
from layercake.quant import BLOCK_ELEMENTS, Compression, QTensor, QuantLinear, Workspace


class Checkpoint(Protocol):
    """What a checkpoint reader offers; tensors are named and shaped as in HF checkpoints."""

    def config_dict(self) -> dict[str, Any]: ...
    def tensor_names(self) -> list[str]: ...
    def tensor_nbytes(self, name: str) -> int: ...

    def stored_dtype(self, name: str) -> torch.dtype | None:
        """The dtype of the stored values, None when they need dequantizing."""

    def load(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor in ``dtype``; a view of the file when it is stored in ``dtype``."""

    def release(self, name: str) -> None:
        """The caller keeps its own copy of the tensor: the file's pages may go."""


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """A checkpoint reader for a HF model directory or a .gguf file; clear error otherwise."""
    p = Path(path).expanduser()
    if not p.exists():
        raise LayercakeError(f"model path not found: {p}")
    if p.is_dir():
        from layercake.checkpoint.safetensors import SafetensorsCheckpoint

        return SafetensorsCheckpoint(p)
    from layercake.checkpoint.gguf import GGUFCheckpoint

    return GGUFCheckpoint(p)


def build_slice(
    ckpt: Checkpoint,
    parts: str | Parts = "f",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    config: BaseConfig | None = None,
    pack: bool = False,
    compress: Compression | None = None,
    blocks: bool = False,
) -> DecoderSlice:
    """Build the slice on the meta device, then assign each parameter from the checkpoint.

    Only the tensors the slice holds are read. A tensor already in ``dtype`` on the CPU stays a
    view of the checkpoint's memory map: weights are never held twice. With ``pack`` (fp32 on
    the CPU), linear weights are packed for MKL's GEMM straight from the checkpoint. With
    ``compress.weight``, linear weights are held quantized (``QuantLinear``) instead; with
    ``blocks`` too, those the block kernel takes are held as ``ops.blocks.Blocks``.
    """
    config = config or load_config(ckpt.config_dict())
    if isinstance(parts, str):
        parts = parse_parts(parts, config.num_hidden_layers)
    fam = family(config.model_type)
    with torch.device("meta"):
        model = fam.Model(config, parts)
    pack = pack and dtype == torch.float32 and torch.device(device).type == "cpu"
    pack = pack and packing_available()
    names = set(ckpt.tensor_names())
    loaded: dict[tuple[str, torch.dtype], torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}
    packed: list[tuple[str, str]] = []  # (linear module name, checkpoint tensor name)
    quantized: list[tuple[str, str]] = []
    compress = compress if compress is not None and compress.weight is not None else None
    for name, p in model.named_parameters():
        src = fam.Model.source_name(name, names) if config.tie_word_embeddings else name
        if src not in names:
            raise LayercakeError(f"checkpoint has no tensor {name!r} (needed by part {parts})")
        owner_name, _, pname = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if (pack or compress) and type(owner) is nn.Linear and pname == "weight":
            (quantized if compress else packed).append((owner_name, src))
            continue
        want = _embedding_dtype(ckpt, src, dtype, device) if isinstance(owner, Embedding) else dtype
        if want != dtype:
            owner.compute_dtype = dtype
        if (src, want) not in loaded:
            loaded[src, want] = _check_shape(ckpt.load(src, want), src, p).to(device)
        state[name] = loaded[src, want]
    model.load_state_dict(state, assign=True, strict=not (packed or quantized))
    if quantized:
        _quantize_linears(ckpt, model, quantized, compress, device, dtype, blocks)
    scratch = torch.empty(BLOCK_BYTES // 4) if packed else None
    for owner_name, src in packed:
        parent, _, child = owner_name.rpartition(".")
        linear = model.get_submodule(owner_name)
        source = loaded.get((src, torch.float32))  # a tied head: the embedding, loaded already
        if source is None:  # as stored: a view of the file where it can be
            source = ckpt.load(src, ckpt.stored_dtype(src) or torch.float32)
        module = PackedLinear(_check_shape(source, src, linear.weight), linear.bias, scratch)
        setattr(model.get_submodule(parent), child, module)
        ckpt.release(src)
    model.requires_grad_(False)
    return model.eval()


def _quantize_linears(
    ckpt: Checkpoint, model: nn.Module, linears: list[tuple[str, str]], compress: Compression,
    device: torch.device | str, dtype: torch.dtype, blocks: bool = False,
) -> None:  # fmt: skip
    """Replace each linear by a ``QuantLinear`` read straight into the quantized row layout;
    all of them dequantize into one shared workspace (a block of at most 64 MB). An int4 weight
    the CPU kernel takes is repacked for it instead (``Int4Linear``: no dequantize step)."""
    shapes = [tuple(model.get_submodule(name).weight.shape) for name, _ in linears]
    need = min(BLOCK_ELEMENTS, max(o * i for o, i in shapes))
    ws = Workspace(need, dtype, device)
    for (owner_name, src), (o, i) in zip(linears, shapes):
        quant = weight_quant(ckpt, src, compress, i, head=owner_name == "lm_head")
        spec, rows = quant_spec(quant), load_rows(ckpt, src, quant)
        if tuple(rows.shape) != (o, spec.row_bytes(i)):
            raise LayercakeError(f"tensor {src!r} does not have the shape {(o, i)} config says")
        linear = model.get_submodule(owner_name)
        fp32 = dtype == torch.float32
        if blocks and fp32 and blocks_ok((o, i), spec, device):
            q = QTensor.from_rows(rows, (o, i), spec)
            module = Int4Linear(Blocks.from_quantized(q), linear.bias)
        elif kernel_ok((o, i), spec, device) and fp32:
            data, sz = pack(QTensor.from_rows(rows, (o, i), spec))
            module = Int4Linear(PackedInt4.from_parts(data, sz, spec), linear.bias)
        elif kernel8_ok((o, i), spec, device) and fp32:
            module = Int4Linear(PackedInt8.from_rows(rows, spec), linear.bias)
        else:
            module = QuantLinear(rows.to(device), (o, i), spec, linear.bias, ws)
        parent, _, child = owner_name.rpartition(".")
        setattr(model.get_submodule(parent), child, module)
        ckpt.release(src)


def _check_shape(t: torch.Tensor, src: str, p: torch.Tensor) -> torch.Tensor:
    if tuple(t.shape) != tuple(p.shape):
        raise LayercakeError(
            f"tensor {src!r} has shape {tuple(t.shape)}, config says {tuple(p.shape)}"
        )
    return t


def _embedding_dtype(
    ckpt: Checkpoint, name: str, dtype: torch.dtype, device: torch.device | str
) -> torch.dtype:
    """An embedding table stored narrower than the compute dtype (bf16/fp16 for fp32) stays a
    view of the checkpoint on the CPU: rows are upcast on lookup, exactly, and the table (often
    the biggest tensor) is neither converted nor held twice."""
    stored = ckpt.stored_dtype(name)
    narrower = stored is not None and stored.is_floating_point and stored.itemsize < dtype.itemsize
    return stored if narrower and torch.device(device).type == "cpu" else dtype

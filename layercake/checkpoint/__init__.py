"""Open a checkpoint (HF directory or GGUF file) and build model slices from it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import torch

from layercake.checkpoint.parts import Parts, parse_parts
from layercake.config import BaseConfig, load_config
from layercake.errors import LayercakeError
from layercake.models import family
from layercake.models.base import DecoderSlice
from layercake.models.layers import Embedding


class Checkpoint(Protocol):
    def config_dict(self) -> dict[str, Any]: ...
    def tensor_names(self) -> list[str]: ...
    def tensor_nbytes(self, name: str) -> int: ...
    def load(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor: ...


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
) -> DecoderSlice:
    """Build the slice on the meta device, then assign each parameter from the checkpoint.

    Only the tensors the slice holds are read. A tensor already in ``dtype`` on the CPU stays a
    view of the checkpoint's memory map: weights are never held twice.
    """
    config = config or load_config(ckpt.config_dict())
    if isinstance(parts, str):
        parts = parse_parts(parts, config.num_hidden_layers)
    fam = family(config.model_type)
    with torch.device("meta"):
        model = fam.Model(config, parts)
    names = set(ckpt.tensor_names())
    loaded: dict[tuple[str, torch.dtype], torch.Tensor] = {}
    state = {}
    for name, p in model.named_parameters():
        src = name
        if src not in names and config.tie_word_embeddings:
            src = fam.Model.tied.get(name, name)
        if src not in names:
            raise LayercakeError(f"checkpoint has no tensor {name!r} (needed by part {parts})")
        owner = model.get_submodule(name.rpartition(".")[0])
        want = _embedding_dtype(ckpt, src, dtype, device) if isinstance(owner, Embedding) else dtype
        if want != dtype:
            owner.compute_dtype = dtype
        if (src, want) not in loaded:
            t = ckpt.load(src, want)
            if tuple(t.shape) != tuple(p.shape):
                raise LayercakeError(
                    f"tensor {src!r} has shape {tuple(t.shape)}, config says {tuple(p.shape)}"
                )
            loaded[src, want] = t.to(device)
        state[name] = loaded[src, want]
    model.load_state_dict(state, assign=True, strict=True)
    model.requires_grad_(False)
    return model.eval()


def _embedding_dtype(
    ckpt: Checkpoint, name: str, dtype: torch.dtype, device: torch.device | str
) -> torch.dtype:
    """An embedding table stored narrower than the compute dtype (bf16/fp16 for fp32) stays a
    view of the checkpoint on the CPU: rows are upcast on lookup, exactly, and the table (often
    the biggest tensor) is neither converted nor held twice."""
    stored = getattr(ckpt, "stored_dtype", lambda n: None)(name)
    narrower = stored is not None and stored.is_floating_point and stored.itemsize < dtype.itemsize
    return stored if narrower and torch.device(device).type == "cpu" else dtype

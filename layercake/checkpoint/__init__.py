"""Open a checkpoint (HF directory or GGUF file): reading files only (``models.build`` makes
model slices from it)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import torch

from layercake.errors import LayercakeError


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

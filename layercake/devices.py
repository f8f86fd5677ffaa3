"""Device and dtype: parsing what a user typed, and the defaults (imported by everyone, imports
nothing of layercake but its error type)."""

from __future__ import annotations

import torch

from layercake.errors import LayercakeError


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Compute dtype: fp32 on CPU (bf16/fp16 matmul is ~600x slower there), bf16 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in names:
        raise LayercakeError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}")
    return names[dtype]


def parse_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise LayercakeError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LayercakeError("device cuda asked for, but this PyTorch sees no CUDA GPU")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise LayercakeError("device mps asked for, but MPS is not available here")
    return dev

"""Building blocks shared by the model families: norms, rotary embeddings, cached attention.

Everything here is stateless apart from weights; the KV cache comes in as tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from layercake.kv_cache import AttentionStep, QuantKV
from layercake.ops import kernels


class Embedding(nn.Embedding):
    """An embedding table that may be stored narrower than the compute dtype (e.g. a bf16 view
    of the checkpoint for fp32 compute): looked-up rows are upcast, which is exact, so the big
    table is never converted or held twice."""

    compute_dtype: torch.dtype | None = None  # set by the loader when storage differs

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = F.embedding(ids, self.weight)
        return out if self.compute_dtype is None else out.to(self.compute_dtype)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, weight applied in the input dtype (as transformers does)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused op
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# HF activation names (config "hidden_act" / "activation_function" / "activation") -> function
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,  # exact (erf) GELU, as transformers' "gelu"
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation function for an HF activation name; clear error when unknown."""
    if name not in ACTIVATIONS:
        from layercake.errors import LayercakeError

        supported = ", ".join(ACTIVATIONS)
        raise LayercakeError(f"unsupported activation {name!r}; supported: {supported}")
    return ACTIVATIONS[name]


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), with linear or llama3 scaling applied."""
    # explicit device: models are built under a meta-device context, this table must be real
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv = 1.0 / (theta**exponents)
    if scaling is None:
        return inv
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv / factor
    # llama3: long wavelengths divided by factor, short kept, the band between interpolated
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_ctx = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_ctx / low, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_ctx / high) & ~(wavelen > old_ctx / low)
    return torch.where(medium, smoothed, scaled)


class Rotary:
    """cos/sin tables for a batch of positions; built once per forward, shared by all layers."""

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None) -> None:
        self.inv_freq = rope_inv_freq(head_dim, theta, scaling)  # plain tensor, not a buffer

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        inv = self.inv_freq.to(positions.device)
        freqs = positions[..., None].float() * inv  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x (B, heads, T, hd)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def cached_attention(
    q: torch.Tensor,  # (B, H, T, hd)
    k: torch.Tensor,  # (B, n_kv, T, hd)
    v: torch.Tensor,  # (B, n_kv, T, hd)
    cache_k: torch.Tensor | QuantKV,  # (B, n_kv, capacity, hd)
    cache_v: torch.Tensor | QuantKV,
    step: AttentionStep,
    scale: float | None = None,
) -> torch.Tensor:
    """Write this step's keys/values into the cache and attend over slots [0, end).

    Returns (B, T, H * hd).
    """
    if isinstance(cache_k, torch.Tensor) and cache_k.device != q.device:
        # the cache stays in host RAM and attention runs there (FlexGen's CPU attention): only
        # q, k, v and the result cross the bus
        dev = cache_k.device
        out = cached_attention(q.to(dev), k.to(dev), v.to(dev), cache_k, cache_v, step, scale)
        return out.to(q.device, non_blocking=True)
    if isinstance(cache_k, QuantKV):  # held quantized: written so, read back dequantized
        cache_k.write(step.start, step.end, k)
        cache_v.write(step.start, step.end, v)
        keys, values = cache_k.read(step.end), cache_v.read(step.end)
    else:
        cache_k[:, :, step.start : step.end] = k
        cache_v[:, :, step.start : step.end] = v
        keys, values = cache_k[:, :, : step.end], cache_v[:, :, : step.end]
    B, H, T, hd = q.shape
    if T == 1 and _own_decode_attention(q, keys, values):  # ~4x faster than SDPA at decode sizes
        s = scale if scale is not None else hd**-0.5
        out = kernels.decode_attention(q[:, :, 0], keys, values, step.mask.reshape(B, -1), s)
        return out.view(B, 1, H * hd)
    out = F.scaled_dot_product_attention(
        q, keys, values, attn_mask=step.mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )  # (B, H, T, hd)
    return out.transpose(1, 2).reshape(B, T, H * hd)


def _own_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether a one-token step's attention runs on ``kernels.decode_attention``: fp32 on the
    CPU, in eager mode (compiled graphs keep SDPA, which Inductor fuses), kernels built."""
    return (
        q.device.type == "cpu"
        and q.dtype == keys.dtype == torch.float32
        and keys.stride(-1) == values.stride(-1) == 1
        and not torch.compiler.is_compiling()
        and kernels.available()
    )

"""Building blocks shared by the model families: norms, rotary embeddings, cached attention.

Everything here is stateless apart from weights; the KV cache comes in as tensors.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
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
    # rows already in memory by token id (a tied head's argmax rows, ``models.tied``): a lookup
    # of a few tokens takes them before the table's (memory-mapped, maybe cold) pages
    known: dict[int, torch.Tensor] | None = None

    def reset_parameters(self) -> None:
        """No random init on the meta device (the loader assigns the checkpoint's table): there
        ``normal_`` runs through ``torch._refs``, which imports ``torch._dynamo`` and sympy, ~70 MB
        a process holds for nothing."""
        if self.weight.device.type != "meta":
            super().reset_parameters()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self._known(ids) if self.known else None
        if out is None:
            self.prefetch(ids)
            out = F.embedding(ids, self.weight)
        return out if self.compute_dtype is None else out.to(self.compute_dtype)

    def prefetch(self, ids: torch.Tensor) -> None:
        """Start reading the rows of ``ids`` together (a table that is a memory map of the
        checkpoint, maybe cold under a memory cap; elsewhere it costs a few system calls). Not
        inside a compiled step: there the ids are data, and a per-row ``madvise`` cannot be traced
        (``torch.compile`` fails on it, and serve then falls back to eager steps)."""
        w = self.weight
        if w.device.type == "cpu" and ids.numel() > 1 and not torch.compiler.is_compiling():
            from layercake.offload.tiers import advise_rows

            flat = ids.reshape(-1)
            if self.known:  # the known rows are read from nowhere
                flat = flat[[i not in self.known for i in flat.tolist()]]
            advise_rows(w, flat)

    def remember(self, rows: dict[int, torch.Tensor]) -> None:
        """Keep ``rows`` (token id -> its row of this table, bit for bit) for the next lookups,
        beside the latest ones kept before (a batch's prompts may be run one by one) up to
        ``KNOWN_BYTES``."""
        w = self.weight
        known = self.known or {}
        for i, r in rows.items():
            known.pop(i, None)  # the newest last: the oldest go first
            known[i] = r.to(w.device, w.dtype)
        keep = max(len(rows), KNOWN_BYTES // max(1, w.shape[1] * w.element_size()))
        for i in list(known)[: max(0, len(known) - keep)]:
            del known[i]
        self.known = known or None

    def _known(self, ids: torch.Tensor) -> torch.Tensor | None:
        """The lookup with the known rows, the others from the table; None when none is known
        (or the lookup is a prompt's many tokens)."""
        if ids.numel() > KNOWN_LOOKUP or ids.device != self.weight.device:
            return None
        flat = ids.reshape(-1)
        got = [self.known.get(i) for i in flat.tolist()]
        miss = [k for k, r in enumerate(got) if r is None]
        if len(miss) == len(got):
            return None
        if miss:
            for k, r in zip(miss, F.embedding(flat[miss], self.weight)):
                got[k] = r
        return torch.stack(got).view(*ids.shape, -1)


KNOWN_LOOKUP = 4096  # ids of a lookup that tries the known rows (a decode step's batch)
KNOWN_BYTES = 8 << 20  # known rows kept beyond the latest pass's (2048 of 4 KB)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, weight applied in the input dtype (as transformers does)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._parameters["weight"]  # no __getattr__: called twice a layer per step
        if x.dtype == torch.float32 and w.dtype == torch.float32:
            if kernels.eager_cpu_fp32(x):
                return kernels.rms_norm(x, w, self.eps)  # one op
            return torch.rms_norm(x, w.shape, w, self.eps)
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

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> Rope:
        """The rotation for heads laid out (B, T, heads, hd) (before the transpose)."""
        cos, sin = self(positions, dtype)  # (B, 1, T, hd)
        cos, sin = cos.transpose(1, 2), sin.transpose(1, 2)  # (B, T, 1, hd)
        one = positions.shape[1] == 1 and cos.device.type == "cpu" and dtype == torch.float32
        # compiled graphs fuse the elementwise form
        return Rope(cos, sin, one and not torch.compiler.is_compiling())


@functools.cache
def _half_swap(head_dim: int) -> torch.Tensor:
    """R with ``x @ R = cat(-x[half:], x[:half])`` (rotate-half)."""
    h = head_dim // 2
    R = torch.zeros(head_dim, head_dim, device="cpu")
    idx = torch.arange(h, device="cpu")
    R[idx + h, idx] = -1.0
    R[idx, idx + h] = 1.0
    return R


@dataclass
class Rope:
    """Rotate-half RoPE for one forward: ``cos``/``sin`` (B, T, 1, hd). ``one_token``: a CPU fp32
    one-token step (not compiled), where the rotation runs as one small batched matmul, ``mat``
    (B, hd, hd) (one op per layer instead of six), or inside ``kernels.decode_step``."""

    cos: torch.Tensor
    sin: torch.Tensor
    one_token: bool = False
    _mat: torch.Tensor | None = None

    @property
    def mat(self) -> torch.Tensor | None:
        if self._mat is None and self.one_token:
            B, hd = self.cos.shape[0], self.cos.shape[-1]
            swap = _half_swap(hd) * self.sin.view(B, 1, hd)
            self._mat = torch.diag_embed(self.cos.view(B, hd)) + swap
        return self._mat

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, heads, hd) rotated (a new tensor)."""
        if self.one_token:
            B, _, n, hd = x.shape
            return torch.bmm(x.reshape(B, n, hd), self.mat).view(B, 1, n, hd)
        return apply_rotary(x, self.cos, self.sin)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x (.., hd), cos/sin broadcasting to it."""
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
    if step.slot is not None:  # a compiled step of static shapes: every slot, unwritten masked
        cache_k.index_copy_(2, step.slot, k)
        cache_v.index_copy_(2, step.slot, v)
        keys, values = cache_k, cache_v
    elif isinstance(cache_k, QuantKV):  # held quantized: written so, read back dequantized
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


def one_token_attention(
    qkv: torch.Tensor,  # (B, (H + 2 KV) hd)
    rope: Rope,
    H: int,
    cache_k: torch.Tensor,  # (B, KV, capacity, hd) fp32 on the CPU
    cache_v: torch.Tensor,
    step: AttentionStep,
) -> torch.Tensor:
    """A one-token step of fused q/k/v on the CPU in one call (at one token a step is bound by
    calls, not arithmetic): ``kernels.decode_step`` rotates q and k, writes k and v into the
    cache in place and attends. Returns (B, H * hd). Only for a step ``flat_step`` accepted
    (plain fp32 CPU cache, kernels built, no static slot); its results equal the general
    path's."""
    hd = cache_k.shape[-1]
    return kernels.decode_step(
        qkv, rope.cos, rope.sin, cache_k, cache_v, step.start, step.mask, hd**-0.5, H
    )


def flat_step(rope: Rope, cache_k: object, step: AttentionStep) -> bool:
    """Whether a one-token step runs on 2-D hidden states (B, hidden) through the layers, with
    attention on ``one_token_attention`` (a cache held quantized: the attention's general path,
    which writes and reads it back): the rotation matrix is built (a CPU fp32 step, not
    compiled), the cache fp32 on the CPU (plain, or held quantized with an fp32 work buffer),
    no static slot, our kernels built. Checked once per step, not once per layer."""
    held = cache_k.work if isinstance(cache_k, QuantKV) else cache_k
    return (
        rope.one_token
        and step.slot is None
        and isinstance(held, torch.Tensor)
        and held.dtype == torch.float32
        and held.is_cpu
        and kernels.available()
    )


def _own_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether a one-token step's attention runs on ``kernels.decode_attention``: fp32 on the
    CPU, kernels built (compiled graphs call it too: it skips the masked slots of a static
    cache, which SDPA would compute)."""
    return (
        q.device.type == "cpu"
        and q.dtype == keys.dtype == torch.float32
        and keys.stride(-1) == values.stride(-1) == 1
        and kernels.available()
    )

"""Llama family: Llama 2 / 3 / 3.1 / 3.2, Mistral, Qwen2 (HF model_types llama, mistral, qwen2).

Pre-norm decoder: RMSNorm -> GQA attention with RoPE -> residual; RMSNorm -> SwiGLU MLP -> residual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from layercake.config import BaseConfig, rope_parameters
from layercake.kv_cache import AttentionStep, QuantKV
from layercake.models.base import DecoderSlice
from layercake.models.layers import (
    Embedding,
    RMSNorm,
    Rope,
    Rotary,
    cached_attention,
    flat_step,
    one_token_attention,
)
from layercake.models.parts import Parts
from layercake.ops import kernels

_NONE = torch.empty(0)  # no q/k norm (``kernels.qk_norm_rope``)


@dataclass(frozen=True)
class Config(BaseConfig):
    intermediate_size: int = 0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    qkv_bias: bool = False  # Qwen2, or attention_bias
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    qk_norm: str = ""  # "head": RMSNorm of each q/k head (Qwen3); "proj": of the whole q/k (OLMoE)

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> Config:
        theta, scaling = rope_parameters(d)
        act = d.get("hidden_act", "silu")
        if act != "silu":
            from layercake.errors import LayercakeError

            raise LayercakeError(f"unsupported hidden_act {act!r} for {d['model_type']}")
        qwen = d["model_type"] == "qwen2"
        bias = bool(d.get("attention_bias", False))
        window = d.get("sliding_window")
        if qwen and not d.get("use_sliding_window", False):
            window = None
        return cls(
            **cls.common(d),
            intermediate_size=int(d["intermediate_size"]),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            qkv_bias=qwen or bias,
            o_bias=bias,
            mlp_bias=bool(d.get("mlp_bias", False)),
            sliding_window=int(window) if window else None,
        )


class Attention(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * self.hd, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * self.hd, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * self.hd, bias=c.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.hd, c.hidden_size, bias=c.o_bias)
        self.qkv_proj: nn.Module | None = None  # q, k, v as one weight (``models.build``)
        self.qk_norm = c.qk_norm
        if c.qk_norm:  # before rotary, as the checkpoint's family does
            per_head = c.qk_norm == "head"
            self.q_norm = RMSNorm(self.hd if per_head else self.n_heads * self.hd, c.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd if per_head else self.n_kv * self.hd, c.rms_norm_eps)

    def forward(self, x, rope: Rope, cache_k, cache_v, step: AttentionStep) -> torch.Tensor:
        H, KV, hd = self.n_heads, self.n_kv, self.hd
        fused = self.qkv_proj
        if x.dim() == 2:  # (B, hidden): a flat one-token step (``flat_step`` accepted it)
            if isinstance(cache_k, QuantKV):  # held quantized: the general path writes, reads
                return self.forward(x[:, None], rope, cache_k, cache_v, step)[:, 0]
            qkv = fused.forward(x) if fused is not None else self.qkv(x)
            if self.qk_norm:
                qkv = self.normed(qkv)
            out = one_token_attention(qkv, rope, H, cache_k, cache_v, step)
            return self.o_proj.forward(out)
        B, T, _ = x.shape
        if fused is not None:
            qkv = fused.forward(x)  # (B, T, (H + 2 KV) hd)
            if self.in_place(qkv, rope):  # norms and RoPE in place: no temporaries
                qn, kn = (self.q_norm, self.k_norm) if self.qk_norm else (None, None)
                qw, kw = (qn.weight, kn.weight) if qn is not None else (_NONE, _NONE)
                eps = qn.eps if qn is not None else 0.0
                kernels.qk_norm_rope(qkv, qw, kw, eps, rope.cos, rope.sin, H, KV)
                qk = qkv[..., : (H + KV) * hd].view(B, T, H + KV, hd)
            else:
                if self.qk_norm:
                    qkv = self.normed(qkv)
                qk = rope.apply(qkv[..., : (H + KV) * hd].view(B, T, H + KV, hd))
            q, k = qk[:, :, :H], qk[:, :, H:]  # (B, T, H, hd), (B, T, KV, hd)
            v = qkv[..., (H + KV) * hd :].view(B, T, KV, hd)
        else:
            q, k = self.q_proj(x), self.k_proj(x)
            if self.qk_norm:
                q, k = self.norm_qk(q, k)
            q = rope.apply(q.view(B, T, H, hd))
            k = rope.apply(k.view(B, T, KV, hd))
            v = self.v_proj(x).view(B, T, KV, hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        return self.o_proj.forward(cached_attention(q, k, v, cache_k, cache_v, step))

    def in_place(self, qkv: torch.Tensor, rope: Rope) -> bool:
        """Whether fused projections ``qkv`` of several tokens take their q/k norms and RoPE in
        place (``kernels.qk_norm_rope``): eager fp32 on the CPU, contiguous, fp32 norms of one
        eps. Same values as ``normed`` then ``rope.apply``; their temporaries were most of a
        prompt's fresh pages (moe11)."""
        if rope.one_token or not qkv.is_contiguous() or not kernels.eager_cpu_fp32(qkv):
            return False
        cos = rope.cos  # (B, T, 1, hd): one row per token (not broadcast over the batch)
        if cos.dtype != torch.float32 or cos.device != qkv.device:
            return False
        if cos.numel() * qkv.shape[-1] != qkv.numel() * self.hd:
            return False
        if not self.qk_norm:
            return True
        qn, kn = self.q_norm, self.k_norm
        return qn.weight.dtype == kn.weight.dtype == torch.float32 and qn.eps == kn.eps

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        """q, k, v side by side, from separate weights (a streamed layer)."""
        return torch.cat((self.q_proj(x), self.k_proj(x), self.v_proj(x)), dim=-1)

    def normed(self, qkv: torch.Tensor) -> torch.Tensor:
        """Fused q|k|v (.., (H + 2 KV) hd) with q and k through their RMS norms."""
        H, KV, hd = self.n_heads, self.n_kv, self.hd
        q, k = self.norm_qk(qkv[..., : H * hd], qkv[..., H * hd : (H + KV) * hd])
        return torch.cat((q, k, qkv[..., (H + KV) * hd :]), dim=-1)

    def norm_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q (.., H hd), k (.., KV hd) through their RMS norms (per head or whole)."""
        if self.qk_norm == "head":
            hd = self.hd
            q = self.q_norm.forward(q.unflatten(-1, (-1, hd))).flatten(-2)
            k = self.k_norm.forward(k.unflatten(-1, (-1, hd))).flatten(-2)
            return q, k
        return self.q_norm.forward(q), self.k_norm.forward(k)


class MLP(nn.Module):
    def __init__(self, c: Config, size: int | None = None) -> None:
        """``size``: the intermediate width (an expert's or a shared expert's), else the
        config's."""
        super().__init__()
        size = size or c.intermediate_size
        self.gate_proj = nn.Linear(c.hidden_size, size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(size, c.hidden_size, bias=c.mlp_bias)
        self.gate_up_proj: nn.Module | None = None  # gate and up as one weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.gate_up_proj
        if fused is not None:
            gu = fused.forward(x)  # (B, T, 2 I)
            if kernels.eager_cpu_fp32(gu):
                return self.down_proj.forward(kernels.silu_mul(gu))
            n = gu.shape[-1] // 2
            act = F.silu(gu[..., :n]).mul_(gu[..., n:])
        else:  # in place on the fresh intermediate: no second (tokens x I) allocation
            act = F.silu(self.gate_proj(x), inplace=True).mul_(self.up_proj(x))
        return self.down_proj.forward(act)

    def forward_into(self, x: torch.Tensor, out: torch.Tensor) -> bool:
        """``forward(x)`` written into ``out`` (N, hidden), which may be ``x`` itself (read
        first), where the fused gate/up and a ``bf16`` down projection run on our kernels (an
        expert of a prompt's pass: ``moe.grouped`` then copies no output); False (nothing
        written) elsewhere. The same values as ``forward``."""
        fused, down = self.gate_up_proj, self.down_proj
        w = getattr(down, "weight", None)
        if fused is None or not hasattr(w, "linear_into") or not kernels.eager_cpu_fp32(x):
            return False
        if w.widens(x.numel() // x.shape[-1]):  # the down projection's rows: x's
            return False
        gu = fused.forward(x)  # (N, 2 I)
        return w.linear_into(kernels.silu_mul(gu), out, down._parameters["bias"])


class Layer(nn.Module):
    def __init__(self, c: Config, mlp: nn.Module | None = None) -> None:
        """``mlp``: another feed-forward module (a mixture of experts), else the SwiGLU MLP."""
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = mlp if mlp is not None else MLP(c)

    def forward(self, h, rope, cache_k, cache_v, step: AttentionStep) -> torch.Tensor:
        # children's forward called directly (no hooks are used): a one-token step is bound by
        # calls, and nn.Module's __call__ costs as much as a small op
        h = h + self.self_attn.forward(
            self.input_layernorm.forward(h), rope, cache_k, cache_v, step
        )
        return h + self.mlp.forward(self.post_attention_layernorm.forward(h))


class Model(DecoderSlice):
    tied = {"lm_head.weight": "model.embed_tokens.weight"}
    # linears built as one weight where they are held alike (``models.build``)
    fused = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}

    def __init__(self, config: Config, parts: Parts) -> None:
        super().__init__(config, parts)
        c = config
        self.model = nn.Module()
        if parts.embed:
            self.model.embed_tokens = Embedding(c.vocab_size, c.hidden_size)
        self.model.layers = nn.ModuleDict({str(i): self.make_layer(i) for i in parts.layers})
        if parts.head:
            self.model.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
            self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.rotary = Rotary(c.head_dim, c.rope_theta, c.rope_scaling)

    def make_layer(self, layer: int) -> Layer:
        """Layer ``layer``'s module (families with another feed-forward override this)."""
        return Layer(self.config)

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(tokens)

    def layers(self) -> nn.ModuleDict:
        return self.model.layers

    def context(self, positions: torch.Tensor, dtype: torch.dtype) -> Any:
        return self.rotary.rope(positions, dtype)

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.norm(h)

    def flat(self, ctx: Rope, cache_k: object, step: AttentionStep) -> bool:
        return flat_step(ctx, cache_k, step)

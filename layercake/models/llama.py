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
from layercake.kv_cache import AttentionStep
from layercake.models.base import DecoderSlice
from layercake.models.layers import Embedding, RMSNorm, Rotary, apply_rotary, cached_attention
from layercake.models.parts import Parts


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

    def forward(self, x, rope, cache_k, cache_v, step: AttentionStep) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, n_kv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.o_proj(cached_attention(q, k, v, cache_k, cache_v, step))


class MLP(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in place on the fresh intermediate: no second (tokens x intermediate) allocation
        return self.down_proj(F.silu(self.gate_proj(x), inplace=True).mul_(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, h, rope, cache_k, cache_v, step: AttentionStep) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), rope, cache_k, cache_v, step)
        return h + self.mlp(self.post_attention_layernorm(h))


class Model(DecoderSlice):
    tied = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: Config, parts: Parts) -> None:
        super().__init__(config, parts)
        c = config
        self.model = nn.Module()
        if parts.embed:
            self.model.embed_tokens = Embedding(c.vocab_size, c.hidden_size)
        self.model.layers = nn.ModuleDict({str(i): Block(c) for i in parts.layers})
        if parts.head:
            self.model.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
            self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.rotary = Rotary(c.head_dim, c.rope_theta, c.rope_scaling)

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(tokens)

    def blocks(self) -> nn.ModuleDict:
        return self.model.layers

    def context(self, positions: torch.Tensor, dtype: torch.dtype) -> Any:
        return self.rotary(positions, dtype)

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.norm(h)

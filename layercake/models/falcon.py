"""Falcon family (HF model_type falcon): Falcon-7B, Falcon-40B / 180B, and their variants.

LayerNorm decoder with rotary attention from one fused ``query_key_value`` projection and a GELU
MLP. Three layouts of the fused projection, as transformers' ``FalconAttention._split_heads``:
- ``new_decoder_architecture`` (40B/180B): ``num_kv_heads`` groups, each [q * (H / n_kv), k, v];
- ``multi_query`` (7B): [q * H, k, v], one KV head shared by all query heads;
- neither: per head [q, k, v] interleaved, as many KV heads as query heads.
Attention and MLP run in parallel off the same residual (``parallel_attn``, with one LayerNorm or
``ln_attn`` + ``ln_mlp``), or one after the other with ``post_attention_layernorm``.
ALiBi checkpoints (falcon-rw) are not supported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from layercake.config import BaseConfig, rope_parameters
from layercake.errors import LayercakeError
from layercake.kv_cache import AttentionStep
from layercake.models.base import DecoderSlice
from layercake.models.layers import Embedding, Rotary, activation, apply_rotary, cached_attention
from layercake.models.parts import Parts


@dataclass(frozen=True)
class Config(BaseConfig):
    ffn_hidden_size: int = 0
    layer_norm_epsilon: float = 1e-5
    new_decoder_architecture: bool = False
    multi_query: bool = True
    parallel_attn: bool = True
    num_ln_in_parallel_attn: int = 1  # 2: separate ln_attn / ln_mlp (new architecture only)
    bias: bool = False
    activation: str = "gelu"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> Config:
        if d.get("alibi", False):
            raise LayercakeError(
                "Falcon with ALiBi positions (alibi=true, e.g. falcon-rw) is not supported; "
                "rotary Falcon models (falcon-7b/40b/180b) are"
            )
        d = dict(d)
        if d.get("hidden_size") is None and d.get("n_embed") is not None:  # old name, as HF
            d["hidden_size"] = d["n_embed"]
        hidden, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
        new_arch = bool(d.get("new_decoder_architecture", False))
        multi_query = bool(d.get("multi_query", True))
        parallel = bool(d.get("parallel_attn", True))
        if new_arch:
            n_kv = int(d.get("num_kv_heads") or heads)
        elif multi_query:
            n_kv = 1
        else:  # transformers reshapes keys to num_kv_heads, which only works when it equals heads
            n_kv = heads
        if heads % n_kv:
            raise LayercakeError(
                f"num_attention_heads {heads} is not a multiple of num_kv_heads {n_kv}"
            )
        if new_arch and not parallel:
            # transformers' FalconDecoderLayer cannot run this combination either
            raise LayercakeError(
                "Falcon new_decoder_architecture with parallel_attn=false is not supported"
            )
        # HF: the new architecture defaults to two norms; the old one always reads input_layernorm
        num_ln = int(d.get("num_ln_in_parallel_attn") or 2) if new_arch else 1
        act = d.get("activation", "gelu")
        activation(act)  # unknown activation: fail at config time, not mid-forward
        theta, scaling = rope_parameters(d)
        return cls(
            # defaults as FalconConfig's: old config.json files leave out what equals them
            **cls.common(
                d,
                num_key_value_heads=n_kv,
                head_dim=hidden // heads,
                tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            ),
            ffn_hidden_size=int(d.get("ffn_hidden_size") or 4 * hidden),
            layer_norm_epsilon=float(d.get("layer_norm_epsilon") or 1e-5),
            new_decoder_architecture=new_arch,
            multi_query=multi_query,
            parallel_attn=parallel,
            num_ln_in_parallel_attn=num_ln,
            bias=bool(d.get("bias", False)),
            activation=act,
            rope_theta=theta,
            rope_scaling=scaling,
        )


class Attention(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.c = c
        self.n_heads, self.n_kv, self.hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.query_key_value = nn.Linear(
            c.hidden_size, (self.n_heads + 2 * self.n_kv) * self.hd, bias=c.bias
        )
        self.dense = nn.Linear(self.n_heads * self.hd, c.hidden_size, bias=c.bias)

    def split(self, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, T, H, hd), k and v (B, T, n_kv, hd) from the fused projection (B, T, out)."""
        B, T, _ = fused.shape
        H, n_kv, hd = self.n_heads, self.n_kv, self.hd
        if self.c.new_decoder_architecture:
            # per KV group: its H/n_kv query heads, then its key, then its value. Query head j of
            # group g lands at index g * (H/n_kv) + j, the head SDPA's enable_gqa maps to KV head g.
            g = H // n_kv
            qkv = fused.view(B, T, n_kv, g + 2, hd)
            q = qkv[:, :, :, :g].reshape(B, T, H, hd)
            return q, qkv[:, :, :, g], qkv[:, :, :, g + 1]  # k, v: (B, T, n_kv, hd)
        if self.c.multi_query:
            qkv = fused.view(B, T, H + 2, hd)
            return qkv[:, :, :H], qkv[:, :, H : H + 1], qkv[:, :, H + 1 :]
        qkv = fused.view(B, T, H, 3, hd)  # per head [q, k, v]
        return qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]

    def forward(self, x, rope, cache_k, cache_v, step: AttentionStep) -> torch.Tensor:
        q, k, v = (t.transpose(1, 2) for t in self.split(self.query_key_value(x)))  # (B, *, T, hd)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.dense(cached_attention(q, k, v, cache_k, cache_v, step))


class MLP(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(c.hidden_size, c.ffn_hidden_size, bias=c.bias)
        self.dense_4h_to_h = nn.Linear(c.ffn_hidden_size, c.hidden_size, bias=c.bias)
        self.act = activation(c.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class Layer(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        eps = c.layer_norm_epsilon
        self.parallel = c.parallel_attn
        self.two_norms = c.parallel_attn and c.num_ln_in_parallel_attn == 2
        if self.two_norms:
            self.ln_attn = nn.LayerNorm(c.hidden_size, eps=eps)
            self.ln_mlp = nn.LayerNorm(c.hidden_size, eps=eps)
        else:
            self.input_layernorm = nn.LayerNorm(c.hidden_size, eps=eps)
        if not c.parallel_attn:
            self.post_attention_layernorm = nn.LayerNorm(c.hidden_size, eps=eps)
        self.self_attention = Attention(c)
        self.mlp = MLP(c)

    def forward(self, h, rope, cache_k, cache_v, step: AttentionStep) -> torch.Tensor:
        if self.two_norms:
            attn_in, mlp_in = self.ln_attn(h), self.ln_mlp(h)
        else:
            attn_in = mlp_in = self.input_layernorm(h)
        attn = self.self_attention(attn_in, rope, cache_k, cache_v, step)
        if self.parallel:
            # same summation order as transformers: (mlp + attn) + residual
            return (self.mlp(mlp_in) + attn) + h
        h = h + attn
        return self.mlp(self.post_attention_layernorm(h)) + h


class Model(DecoderSlice):
    tied = {"lm_head.weight": "transformer.word_embeddings.weight"}

    def __init__(self, config: Config, parts: Parts) -> None:
        super().__init__(config, parts)
        c = config
        self.transformer = nn.Module()
        if parts.embed:
            self.transformer.word_embeddings = Embedding(c.vocab_size, c.hidden_size)
        self.transformer.h = nn.ModuleDict({str(i): Layer(c) for i in parts.layers})
        if parts.head:
            self.transformer.ln_f = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_epsilon)
            self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.rotary = Rotary(c.head_dim, c.rope_theta, c.rope_scaling)

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.transformer.word_embeddings(tokens)  # (B, T, hidden)

    def layers(self) -> nn.ModuleDict:
        return self.transformer.h

    def context(self, positions: torch.Tensor, dtype: torch.dtype) -> Any:
        return self.rotary(positions, dtype)  # cos, sin: (B, 1, T, hd)

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.transformer.ln_f(h)

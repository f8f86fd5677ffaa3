"""OPT family (HF model_type opt): facebook/opt-125m ... opt-66b, and the odd one out, opt-350m.

Decoder with learned absolute positions (table offset by 2), LayerNorm, multi-head attention
(no GQA, no rotary), a ReLU MLP (fc1/fc2). Most sizes are pre-LN with a final LayerNorm; opt-350m is
post-LN, has no final LayerNorm, and runs the layers at ``hidden_size`` while its embeddings are
``word_embed_proj_dim`` wide (project_in after the embedding, project_out before the head).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from layercake.config import BaseConfig
from layercake.kv_cache import AttentionStep
from layercake.models.base import DecoderSlice
from layercake.models.layers import Embedding, activation, cached_attention
from layercake.models.parts import Parts

# OPT's position table has two extra rows in front (a fairseq padding_idx leftover): position p
# reads row p + 2
POSITION_OFFSET = 2


@dataclass(frozen=True)
class Config(BaseConfig):
    ffn_dim: int = 0
    word_embed_proj_dim: int = 0
    do_layer_norm_before: bool = True  # pre-LN; False = post-LN (opt-350m)
    final_layer_norm: bool = True  # the decoder's own final LayerNorm exists
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    activation_function: str = "relu"

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> Config:
        hidden, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
        pre_ln = bool(d.get("do_layer_norm_before", True))
        act = d.get("activation_function", "relu")
        activation(act)  # unknown activation: fail at config time, not mid-forward
        return cls(
            # defaults as OPTConfig's: old config.json files leave out what equals them
            **cls.common(
                d,
                num_key_value_heads=heads,
                head_dim=hidden // heads,
                tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            ),
            ffn_dim=int(d["ffn_dim"]),
            word_embed_proj_dim=int(d.get("word_embed_proj_dim") or hidden),
            do_layer_norm_before=pre_ln,
            # transformers builds it only for pre-LN models; _remove_final_layer_norm marks
            # checkpoints fine-tuned before the metaseq fix that have none
            final_layer_norm=pre_ln and not d.get("_remove_final_layer_norm", False),
            enable_bias=bool(d.get("enable_bias", True)),
            layer_norm_elementwise_affine=bool(d.get("layer_norm_elementwise_affine", True)),
            activation_function=act,
        )


def _layer_norm(c: Config) -> nn.LayerNorm:
    # eps 1e-5 (torch's default) is what transformers uses for OPT; it is not in config.json
    return nn.LayerNorm(c.hidden_size, elementwise_affine=c.layer_norm_elementwise_affine)


class Attention(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.n_heads, self.hd = c.num_attention_heads, c.head_dim
        self.scaling = self.hd**-0.5
        width = self.n_heads * self.hd
        self.k_proj = nn.Linear(c.hidden_size, width, bias=c.enable_bias)
        self.v_proj = nn.Linear(c.hidden_size, width, bias=c.enable_bias)
        self.q_proj = nn.Linear(c.hidden_size, width, bias=c.enable_bias)
        self.out_proj = nn.Linear(width, c.hidden_size, bias=c.enable_bias)

    def forward(self, x, cache_k, cache_v, step: AttentionStep) -> torch.Tensor:
        B, T, _ = x.shape
        # scale q before the product, as OPT (and transformers) do: same rounding as the reference
        q = (self.q_proj(x) * self.scaling).view(B, T, self.n_heads, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, H, T, hd)
        v = self.v_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)
        return self.out_proj(cached_attention(q, k, v, cache_k, cache_v, step, scale=1.0))


class Layer(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.pre_ln = c.do_layer_norm_before
        self.self_attn = Attention(c)
        self.self_attn_layer_norm = _layer_norm(c)
        self.fc1 = nn.Linear(c.hidden_size, c.ffn_dim, bias=c.enable_bias)
        self.fc2 = nn.Linear(c.ffn_dim, c.hidden_size, bias=c.enable_bias)
        self.final_layer_norm = _layer_norm(c)
        self.act = activation(c.activation_function)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))

    def forward(self, h, ctx, cache_k, cache_v, step: AttentionStep) -> torch.Tensor:
        if self.pre_ln:
            h = h + self.self_attn(self.self_attn_layer_norm(h), cache_k, cache_v, step)
            return h + self.mlp(self.final_layer_norm(h))
        # post-LN (opt-350m): normalize after each residual add
        h = self.self_attn_layer_norm(h + self.self_attn(h, cache_k, cache_v, step))
        return self.final_layer_norm(h + self.mlp(h))


class Model(DecoderSlice):
    tied = {"lm_head.weight": "model.decoder.embed_tokens.weight"}

    def __init__(self, config: Config, parts: Parts) -> None:
        super().__init__(config, parts)
        c = config
        projected = c.word_embed_proj_dim != c.hidden_size
        self.model = nn.Module()
        d = self.model.decoder = nn.Module()
        if parts.embed:
            d.embed_tokens = Embedding(c.vocab_size, c.word_embed_proj_dim)
            d.embed_positions = Embedding(
                c.max_position_embeddings + POSITION_OFFSET, c.hidden_size
            )
            if projected:
                d.project_in = nn.Linear(c.word_embed_proj_dim, c.hidden_size, bias=False)
        d.layers = nn.ModuleDict({str(i): Layer(c) for i in parts.layers})
        if parts.head:
            if c.final_layer_norm:
                d.final_layer_norm = _layer_norm(c)
            if projected:
                d.project_out = nn.Linear(c.hidden_size, c.word_embed_proj_dim, bias=False)
            self.lm_head = nn.Linear(c.word_embed_proj_dim, c.vocab_size, bias=False)

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        d = self.model.decoder
        h = d.embed_tokens(tokens)  # (B, T, word_embed_proj_dim)
        if hasattr(d, "project_in"):
            h = d.project_in(h)  # (B, T, hidden)
        # the runner's per-row positions start at 0 at each row's first real token, which is what
        # transformers derives from the attention mask of a left-padded batch. Padding slots may
        # carry any position, even negative (their outputs are never read): clamp those to row 0.
        rows = (positions + POSITION_OFFSET).clamp_min(0)  # (B, T)
        return h + d.embed_positions(rows)  # (B, T, hidden)

    def layers(self) -> nn.ModuleDict:
        return self.model.decoder.layers

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        d = self.model.decoder
        if hasattr(d, "final_layer_norm"):
            h = d.final_layer_norm(h)
        if hasattr(d, "project_out"):
            h = d.project_out(h)  # (B, T, word_embed_proj_dim)
        return h

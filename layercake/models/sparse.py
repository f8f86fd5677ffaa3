"""Mixture-of-experts decoders (HF model_types mixtral, qwen2_moe, qwen3_moe, olmoe): the Llama
decoder (``models.llama``: GQA attention with RoPE, the fused q/k/v and one-token paths) whose
feed-forward is a ``models.moe.SparseMoE`` in every layer (Qwen-MoE: but ``mlp_only_layers``).

Per family: Mixtral renormalises the top-k weights; Qwen2-MoE adds q/k/v biases and a shared
expert behind a sigmoid gate; Qwen3-MoE adds Qwen3's per-head q/k norms; OLMoE normalises the
whole q and k projections. Parameter names follow the per-expert checkpoints of Qwen-MoE and
OLMoE (``model.layers.N.mlp.experts.E.gate_proj.weight``); ``checkpoint.experts`` maps Mixtral's
names and stacked expert tensors onto them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from layercake.errors import LayercakeError
from layercake.models import llama
from layercake.models.llama import Layer
from layercake.models.moe import SparseMoE
from layercake.models.qwen3 import without_window

# model_type -> (renormalise the top-k weights by default, q/k norm)
FAMILY = {
    "mixtral": (True, ""),
    "qwen2_moe": (False, ""),
    "qwen3_moe": (False, "head"),
    "olmoe": (False, "proj"),
}


@dataclass(frozen=True)
class Config(llama.Config):
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0  # each routed expert's width
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    norm_topk_prob: bool = False
    dense_layers: tuple[int, ...] = ()  # layers whose feed-forward is a plain MLP

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> Config:
        mt = d["model_type"]
        renorm, qk_norm = FAMILY[mt]
        base = super().from_hf(d)
        if mt != "mixtral":  # Qwen / OLMoE: full attention
            base = without_window(d, base)
        if mt == "olmoe" and d.get("clip_qkv") is not None:
            raise LayercakeError("olmoe: clip_qkv is not supported")
        experts = int(d.get("num_experts") or d.get("num_local_experts") or 0)
        top_k = int(d["num_experts_per_tok"])
        if not 1 <= top_k <= experts:
            raise ValueError(f"num_experts_per_tok {top_k} with {experts} experts")
        qwen = mt.startswith("qwen")
        width = int(d["moe_intermediate_size"]) if qwen else base.intermediate_size
        step = int(d.get("decoder_sparse_step") or 1) if qwen else 1
        only = set(d.get("mlp_only_layers") or []) if qwen else set()
        dense = tuple(i for i in range(base.num_hidden_layers) if i in only or (i + 1) % step)
        return replace(
            base,
            qk_norm=qk_norm,
            qkv_bias=bool(d.get("qkv_bias", True)) if mt == "qwen2_moe" else base.qkv_bias,
            o_bias=False if mt == "qwen2_moe" else base.o_bias,
            num_experts=experts,
            num_experts_per_tok=top_k,
            moe_intermediate_size=width,
            shared_expert_intermediate_size=int(d.get("shared_expert_intermediate_size") or 0)
            if mt == "qwen2_moe" else 0,
            norm_topk_prob=renorm if mt == "mixtral" else bool(d.get("norm_topk_prob", renorm)),
            dense_layers=dense,
        )  # fmt: skip


class Model(llama.Model):
    config: Config

    def make_layer(self, layer: int) -> Layer:
        c = self.config
        if layer in c.dense_layers:
            return Layer(c)
        moe = SparseMoE(c, c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size,
                        c.norm_topk_prob, c.shared_expert_intermediate_size)  # fmt: skip
        return Layer(c, moe)

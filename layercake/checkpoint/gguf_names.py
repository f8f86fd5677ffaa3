"""llama.cpp's names in a GGUF file -> Hugging Face's: tensors, architectures, config keys.

Per architecture only what differs: llama (Llama, Mistral; with ``expert_count`` Mixtral),
qwen3, qwen2moe, qwen3moe and olmoe share the tensor names below. Experts are stacked, one
tensor per layer for all experts (``ffn_gate_exps`` ...): they get transformers 5's stacked
names (``mlp.experts.gate_proj``, (E, I, hidden)), which ``checkpoint.experts`` splits into
one tensor per expert.
"""

from __future__ import annotations

from typing import Any

GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",  # the router
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
# stacked experts: named without ".weight", as transformers 5 names its stacked parameters
STACKED_NAMES = {
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
}
# Tensors the file may carry that are not parameters: llama 3's rope frequency factors become
# `rope_scaling` in the config instead.
NOT_PARAMETERS = {"rope_freqs.weight"}
# GGUF architecture -> (HF model_type, HF architecture); llama with experts is Mixtral
ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "qwen2moe": ("qwen2_moe", "Qwen2MoeForCausalLM"),
    "qwen3moe": ("qwen3_moe", "Qwen3MoeForCausalLM"),
    "olmoe": ("olmoe", "OlmoeForCausalLM"),
}
# Whether llama.cpp renormalises the top-k expert weights of each architecture (its
# ``expert_weights_norm`` key, where a file states it, wins)
RENORM = {"llama": True, "qwen2moe": False, "qwen3moe": True, "olmoe": False}
# HF config key -> the architecture-scoped GGUF metadata key it is read from
CONFIG_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "embedding_length",
    "intermediate_size": "feed_forward_length",
    "num_hidden_layers": "block_count",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
    "head_dim": "attention.key_length",
    "rope_dim": "rope.dimension_count",
    "max_position_embeddings": "context_length",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    "rope_theta": "rope.freq_base",
    "num_experts": "expert_count",
    "num_experts_per_tok": "expert_used_count",
    "moe_intermediate_size": "expert_feed_forward_length",
    "shared_expert_intermediate_size": "expert_shared_feed_forward_length",
}


def hf_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None if unknown."""
    parts = gguf_name.split(".")
    if len(parts) == 2 and parts[0] in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    if len(parts) != 4 or parts[0] != "blk" or not parts[1].isdigit():
        return None
    if parts[2] in STACKED_NAMES and parts[3] == "weight":
        return f"model.layers.{parts[1]}.{STACKED_NAMES[parts[2]]}"
    if parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def moe_fields(arch: str, raw: dict[str, Any], meta: Any, has: Any) -> dict[str, Any]:
    """The config keys of a mixture of experts (``raw`` holds what ``CONFIG_KEYS`` read;
    ``meta(key)``: an architecture-scoped value; ``has(name)``: whether a tensor exists).
    Empty for a dense model."""
    if not raw.get("num_experts"):
        return {}
    out: dict[str, Any] = {"model_type": ARCHITECTURES[arch][0]}
    if arch == "llama":
        out.update(model_type="mixtral", architectures=["MixtralForCausalLM"])
        out["num_local_experts"] = raw["num_experts"]
    norm = meta("expert_weights_norm")
    out["norm_topk_prob"] = bool(norm) if norm is not None else RENORM.get(arch, False)
    if arch == "qwen2moe":
        out["qkv_bias"] = has("model.layers.0.self_attn.q_proj.bias")
    return out

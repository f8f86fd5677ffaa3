"""A random OLMoE-shaped checkpoint for the MoE offload benchmark, written once and reused.

``olmoe(layers, skew)``: OLMoE-1B-7B's shapes (hidden 2048, 16 heads, q/k norms, 64 experts of
FFN 1024, top-8, vocab 50304, untied head) with fewer layers, bf16, per-expert tensors
(``model.layers.N.mlp.experts.E.gate_proj.weight``) as transformers saves an OLMoE, one
safetensors shard per layer with an index, SmolLM2's tokenizer (ids stay below its vocab).
``olmoe_gguf(...)``: the same weights as a GGUF in the tensor names and layout llama.cpp's OLMoE
loader expects (stacked ``blk.N.ffn_{gate,up,down}_exps``, bf16; norms f32), with the embedded
GGUF's tokenizer padded to the vocabulary.

Weights are drawn like the dense benchmark checkpoint's (``checkpoints.random_matrix``: 1/sqrt
(fan_in), embeddings 0.02, norms 1) so the layers and the router decide the tokens. ``skew``
emulates real routing: expert e's router row is scaled by exp(-skew * rank / 63), the ranks
shuffled per layer, so a few experts win top-8 more often (skew 1: the 16 most used experts
take about 42 % of the selections, the most used about 8x the least used); 0 is uniform.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from checkpoints import (  # noqa: E402
    DEFAULT_CACHE,
    EMBED_STD,
    _copy_tokenizer,
    random_matrix,
    write_random_llama,
)

if TYPE_CHECKING:
    import torch

VERSION = 1  # bump whenever the generator's output changes: names the cached checkpoint

OLMOE = dict(  # OLMoE-1B-7B-0924's config as transformers 5 saves it, num_hidden_layers set below
    model_type="olmoe",
    architectures=["OlmoeForCausalLM"],
    vocab_size=50304,
    hidden_size=2048,
    intermediate_size=1024,
    num_attention_heads=16,
    num_key_value_heads=16,
    num_experts=64,
    num_experts_per_tok=8,
    norm_topk_prob=False,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    attention_bias=False,
    attention_dropout=0.0,
    clip_qkv=None,
    tie_word_embeddings=False,
    rope_parameters=dict(rope_theta=10000.0, rope_type="default"),
    router_aux_loss_coef=0.01,
    output_router_logits=False,
    initializer_range=0.02,
    bos_token_id=None,
    eos_token_id=50279,
    pad_token_id=1,
    use_cache=True,
    dtype="bfloat16",
)


def config(layers: int) -> dict:
    return {**OLMOE, "num_hidden_layers": layers}


def expert_bytes(cfg: dict) -> int:
    """Bytes of one expert (gate, up, down) in bf16."""
    return 3 * cfg["hidden_size"] * cfg["intermediate_size"] * 2


def _tensors(cfg: dict, layers: range, embed: bool, gen: torch.Generator, skew: float) -> dict:
    import torch

    H, F, E = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_experts"]
    ones = torch.ones(H, dtype=torch.bfloat16)
    out: dict[str, torch.Tensor] = {}
    if embed:
        out["model.embed_tokens.weight"] = random_matrix(cfg["vocab_size"], H, gen, EMBED_STD)
        out["model.norm.weight"] = ones.clone()
        out["lm_head.weight"] = random_matrix(cfg["vocab_size"], H, gen)
    for i in layers:
        p = f"model.layers.{i}."
        for n in ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm",
                  "self_attn.k_norm"):  # fmt: skip
            out[p + n + ".weight"] = ones.clone()
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[p + f"self_attn.{n}.weight"] = random_matrix(H, H, gen)
        rank = torch.randperm(E, generator=gen).float()
        scale = torch.exp(-skew * rank / (E - 1))[:, None]  # hot experts: larger router rows
        out[p + "mlp.gate.weight"] = (random_matrix(E, H, gen).float() * scale).bfloat16()
        for e in range(E):
            q = f"{p}mlp.experts.{e}."
            out[q + "gate_proj.weight"] = random_matrix(F, H, gen)
            out[q + "up_proj.weight"] = random_matrix(F, H, gen)
            out[q + "down_proj.weight"] = random_matrix(H, F, gen)
    return out


def olmoe(layers: int = 6, skew: float = 1.0, cache: Path = DEFAULT_CACHE) -> Path:
    """Path of the checkpoint, written on first use by a child process (the caller never
    imports torch for it)."""
    d = cache / f"olmoe-{layers}l-skew{skew:g}-random-v{VERSION}"
    if not (d / "model.safetensors.index.json").is_file():
        subprocess.run([sys.executable, __file__, str(d), str(layers), str(skew)], check=True)
    return d


def olmoe_gguf(layers: int = 6, skew: float = 1.0, cache: Path = DEFAULT_CACHE) -> Path:
    """The same weights as a bf16 GGUF for llama.cpp, converted once (a child process)."""
    src = olmoe(layers, skew, cache)
    out = src / "model-bf16.gguf"
    if not out.is_file():
        subprocess.run([sys.executable, __file__, "--gguf", str(src), str(out)], check=True)
    return out


def write(d: Path, layers: int, skew: float) -> None:
    cfg = config(layers)

    def tensors(cfg: dict, rng: range, embed: bool, gen: torch.Generator) -> dict:
        return _tensors(cfg, rng, embed, gen, skew)

    write_random_llama(d, cfg, shards=layers, tensors=tensors)
    _copy_tokenizer(d)


if __name__ == "__main__":  # moe_checkpoint.py DIR LAYERS SKEW | --gguf SRC OUT
    if sys.argv[1] == "--gguf":
        from moe_gguf import write_gguf

        write_gguf(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        write(Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]))
        print(json.dumps({"written": sys.argv[1]}))

"""Random-weight benchmark checkpoints, written once to a cache directory and reused.

``llama_1b(cache)``: a Llama-3.2-1B-shaped checkpoint (hidden 2048, 16 layers, 32 heads, 8 KV
heads, FFN 8192, vocab 128256, tied embeddings, bf16: 1.24 B parameters, 2.5 GB), two shards
with an index, plus SmolLM2's tokenizer so text prompts work.

Every weight is drawn as Hugging Face initializes a Llama (normal, std ``initializer_range`` =
0.02, the embedding included; norms 1), so the layers' outputs dominate the residual stream and
decide the tokens. (Version 1 drew the tied embedding with std 1: the residual stream was the
input token's embedding, the first greedy token was the last prompt token by a wide margin, and
an engine that skipped every layer produced the same tokens.) The cache directory carries
``VERSION``, so a checkpoint written by an older generator is never reused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where tensors are made: benchmark parents stay free of torch
    import torch

VERSION = 2  # bump whenever the generator's output changes: names the cached checkpoint
EMBED_STD = 0.02  # Hugging Face's initializer_range for Llama

DEFAULT_CACHE = Path(
    os.environ.get("LAYERCAKE_BENCH_CACHE", Path.home() / ".cache/layercake-bench")
)

LLAMA_1B = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    tie_word_embeddings=True,
    rope_theta=500000.0,
    bos_token_id=128000,
    eos_token_id=128001,
    rope_scaling=dict(
        rope_type="llama3",
        factor=32.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
    torch_dtype="bfloat16",
)


def random_matrix(
    rows: int, cols: int, gen: torch.Generator, std: float | None = None
) -> torch.Tensor:
    """A bf16 matrix drawn normal with ``std``, by default 1/sqrt(fan_in): a layer's output
    keeps the scale of its input, so the layers decide the tokens."""
    import torch

    std = cols**-0.5 if std is None else std
    return (torch.randn(rows, cols, generator=gen) * std).to(torch.bfloat16)


def _tensors(
    cfg: dict, layers: range, embed: bool, gen: torch.Generator
) -> dict[str, torch.Tensor]:
    import torch

    H, F, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    nq, nkv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd

    def rnd(rows: int, cols: int, std: float | None = None) -> torch.Tensor:
        return random_matrix(rows, cols, gen, std)

    out: dict[str, torch.Tensor] = {}
    if embed:
        out["model.embed_tokens.weight"] = rnd(cfg["vocab_size"], H, EMBED_STD)
        out["model.norm.weight"] = torch.ones(H, dtype=torch.bfloat16)
    for i in layers:
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = torch.ones(H, dtype=torch.bfloat16)
        out[p + "post_attention_layernorm.weight"] = torch.ones(H, dtype=torch.bfloat16)
        out[p + "self_attn.q_proj.weight"] = rnd(nq, H)
        out[p + "self_attn.k_proj.weight"] = rnd(nkv, H)
        out[p + "self_attn.v_proj.weight"] = rnd(nkv, H)
        out[p + "self_attn.o_proj.weight"] = rnd(H, nq)
        out[p + "mlp.gate_proj.weight"] = rnd(F, H)
        out[p + "mlp.up_proj.weight"] = rnd(F, H)
        out[p + "mlp.down_proj.weight"] = rnd(H, F)
    return out


def llama_1b(cache: Path = DEFAULT_CACHE) -> Path:
    """Path of the random Llama-3.2-1B-shaped checkpoint, written on first use by a child
    process (the caller never imports torch for it)."""
    d = cache / f"llama-3.2-1b-random-v{VERSION}"
    if not (d / "model.safetensors.index.json").is_file():
        subprocess.run([sys.executable, __file__, str(d)], check=True)
    return d


def write_random_llama(
    d: Path, cfg: dict, shards: int = 1, seed: int = 0, tensors: Callable = _tensors
) -> Path:
    """A random bf16 Llama checkpoint of config ``cfg`` in ``shards`` safetensors files with an
    index (the last file written, so a present index means a complete checkpoint). ``tensors``
    (cfg, layers, embed, generator) -> named tensors draws another family's weights."""
    import torch
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    n = cfg["num_hidden_layers"]
    bounds = [n * k // shards for k in range(shards + 1)]
    weight_map = {}
    for k in range(shards):
        name = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = tensors(cfg, range(bounds[k], bounds[k + 1]), k == 0, gen)
        save_file(part, d / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
        del part
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return d


def _copy_tokenizer(d: Path) -> None:
    """SmolLM2's tokenizer (from the embedded GGUF) so text prompts work; ids stay < its vocab."""
    try:
        from layercake.checkpoint.gguf import GGUFCheckpoint
        from layercake.llm import embedded_model_path
        from layercake.tokenizer import Tokenizer

        Tokenizer.from_gguf(GGUFCheckpoint(embedded_model_path())).save(d)
    except Exception as e:  # benchmarks feed token ids; a tokenizer is a convenience
        print(f"note: no tokenizer written to {d}: {e}")


if __name__ == "__main__":  # python checkpoints.py DIR: write the 1B-shaped checkpoint there
    write_random_llama(Path(sys.argv[1]), LLAMA_1B, shards=2)
    _copy_tokenizer(Path(sys.argv[1]))

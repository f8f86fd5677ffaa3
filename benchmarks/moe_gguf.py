"""An OLMoE safetensors checkpoint as a GGUF for llama.cpp, written with the ``gguf`` package
(llama.cpp's convert script needs its source tree): the tensor names come from ``gguf``'s own
OLMoE name map, per-expert matrices are stacked into ``blk.N.ffn_{gate,up,down}_exps`` as
llama.cpp's loader expects, bf16 as stored (norms f32), streamed one tensor at a time so the
converter never holds more than one layer's experts. The vocabulary is the embedded SmolLM2
GGUF's, padded with unused control tokens to the checkpoint's vocab size (llama.cpp sizes the
embedding by the token list).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open

ARCH = gguf.MODEL_ARCH.OLMOE
BF16 = gguf.GGMLQuantizationType.BF16


def _names(cfg: dict) -> list[tuple[str, list[str]]]:
    """(GGUF name, the HF tensors it is made of, stacked when several), in file order."""
    n = cfg["num_hidden_layers"]
    m = gguf.get_tensor_name_map(ARCH, n)
    out = [(m.get_name(k) + ".weight", [k + ".weight"])
           for k in ("model.embed_tokens", "model.norm", "lm_head")]  # fmt: skip
    for i in range(n):
        p = f"model.layers.{i}."
        for k in ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj",
                  "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "self_attn.q_norm",
                  "self_attn.k_norm", "mlp.gate"):  # fmt: skip
            out.append((m.get_name(p + k) + ".weight", [p + k + ".weight"]))
        for k in ("gate_proj", "up_proj", "down_proj"):
            parts = [f"{p}mlp.experts.{e}.{k}.weight" for e in range(cfg["num_experts"])]
            out.append((m.get_name(f"{p}mlp.experts.{k}") + ".weight", parts))
    return out


def _array(files: dict[str, object], parts: list[str]) -> tuple[np.ndarray, bool]:
    """The tensor as numpy: bf16 bits as uint16 (is_bf16 True), or f32 for a 1-d norm."""
    ts = [files[p].get_tensor(p) for p in parts]
    t = ts[0] if len(ts) == 1 else torch.stack(ts)
    if t.dim() == 1:
        return t.float().numpy(), False
    return t.contiguous().view(torch.int16).numpy().view(np.uint16), True


def _tokenizer(w: gguf.GGUFWriter, vocab: int) -> None:
    from layercake.llm import embedded_model_path

    r = gguf.GGUFReader(embedded_model_path())

    def val(key: str):
        return r.fields[key].contents()

    tokens, types = list(val("tokenizer.ggml.tokens")), list(val("tokenizer.ggml.token_type"))
    pad = vocab - len(tokens)
    tokens += [f"<|unused_{i}|>" for i in range(pad)]
    types += [int(gguf.TokenType.CONTROL)] * pad
    w.add_tokenizer_model(val("tokenizer.ggml.model"))
    w.add_tokenizer_pre(val("tokenizer.ggml.pre"))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(list(val("tokenizer.ggml.merges")))
    w.add_bos_token_id(val("tokenizer.ggml.bos_token_id"))
    w.add_eos_token_id(val("tokenizer.ggml.eos_token_id"))
    w.add_add_bos_token(False)


def write_gguf(src: Path, out: Path) -> Path:
    """Write ``out`` from the OLMoE checkpoint in ``src`` (renamed into place when complete)."""
    cfg = json.loads((src / "config.json").read_text())
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    files = {k: safe_open(src / f, "pt") for k, f in index.items()}
    tmp = out.with_suffix(".partial")
    w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[ARCH])
    w.add_name("olmoe-random")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_expert_count(cfg["num_experts"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    _tokenizer(w, cfg["vocab_size"])
    plan = _names(cfg)
    for name, parts in plan:  # shapes from the headers, data later: one tensor in memory
        f = files[parts[0]]
        shape = list(f.get_slice(parts[0]).get_shape())
        shape = [len(parts), *shape] if len(parts) > 1 else shape
        n = int(np.prod(shape))
        if len(shape) == 1:
            w.add_tensor_info(name, shape, np.dtype(np.float32), 4 * n)
        else:
            w.add_tensor_info(name, shape, np.dtype(np.uint16), 2 * n, raw_dtype=BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, parts in plan:
        w.write_tensor_data(_array(files, parts)[0])
    w.close()
    tmp.rename(out)
    return out

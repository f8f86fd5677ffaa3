"""Qwen3 and the mixture-of-experts families from GGUF files with stacked expert tensors
(``ffn_gate_exps`` ...), written here with the ``gguf`` package's writer and tensor-name map (as
llama.cpp's converter writes them), against transformers: float, Q8_0 and K-quant experts."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import hf_model, make_hf_checkpoint
from gguf import GGMLQuantizationType as QType
from safetensors.torch import load_file
from test_families import positions, tokens
from test_gguf import llama_cpp_permute
from test_moe_models import BASE, CASES, STEPS, TOL, greedy

from layercake.checkpoint.gguf import GGUFCheckpoint
from layercake.config import load_config
from layercake.models.build import build_slice
from layercake.ops.linear import forms
from layercake.runner import LocalRunner

ARCH = {"qwen3": "qwen3", "mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe",
        "olmoe": "olmoe"}  # fmt: skip
# case id (of test_moe_models) -> its checkpoint as GGUF (GGUF has no dense MoE layers)
GGUF_CASES = ["qwen3", "mixtral", "qwen2_moe-stacked", "qwen3_moe", "olmoe"]
LEAVES = {"gate_proj": 0, "up_proj": 1, "down_proj": 2}


def write_gguf(
    hf_dir: Path, out: Path, experts: dict[str, object] | None = None, values: dict | None = None
) -> Path:
    """``hf_dir`` (per-expert safetensors) as llama.cpp's converter writes it: stacked experts
    (``experts``: leaf -> QType, or raw bytes (E, rows, bytes) to write instead), Q/K rows
    permuted for llama. ``values`` gets each stacked tensor's values as written (dequantized
    here with gguf-py, apart from the reader under test)."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = ARCH[cfg["model_type"]]
    w = gguf.GGUFWriter(str(out), arch)
    n_layers, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"]
    w.add_block_count(n_layers)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    if cfg.get("head_dim"):
        w.add_key_length(cfg["head_dim"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_vocab_size(cfg["vocab_size"])
    n_exp = cfg.get("num_experts") or cfg.get("num_local_experts")
    if n_exp:
        w.add_expert_count(n_exp)
        w.add_expert_used_count(cfg["num_experts_per_tok"])
    if cfg.get("moe_intermediate_size"):
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    if cfg.get("shared_expert_intermediate_size"):
        w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), n_layers)
    state = load_file(hf_dir / "model.safetensors")
    stacks: dict[str, list] = {}
    for name, t in state.items():
        a = t.numpy()
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            a = llama_cpp_permute(a, heads if "q_proj" in name else kv)
        parts = name.split(".")
        if "experts" in parts:  # model.layers.N.mlp.experts.E.leaf.weight
            leaf = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}.get(parts[-2], parts[-2])
            stacks.setdefault(f"model.layers.{parts[2]}.mlp.experts.{leaf}", []).append(a)
            continue
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), a)
    for name, arrays in stacks.items():
        gname = names.get_name(name) + ".weight"
        kind = (experts or {}).get(name.rsplit(".", 1)[1], QType.F32)
        if isinstance(kind, np.ndarray):
            raw, qtype = kind, QTYPE_OF[id(kind)]
        elif kind == QType.F32:
            raw, qtype = np.stack(arrays), None
        else:
            raw, qtype = gguf.quants.quantize(np.stack(arrays), kind), kind
        w.add_tensor(gname, raw, raw_dtype=qtype)
        if values is not None:
            values[name] = torch.from_numpy(gguf.quants.dequantize(raw, qtype or QType.F32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


QTYPE_OF: dict[int, QType] = {}


def with_experts(hf, values: dict) -> None:
    """Set transformers' (stacked) expert weights to the values written to the GGUF."""
    for i, layer in enumerate(hf.model.layers):
        ex, p = layer.mlp.experts, f"model.layers.{i}.mlp.experts"
        ex.gate_up_proj.data.copy_(torch.cat([values[f"{p}.gate_proj"], values[f"{p}.up_proj"]], 1))
        ex.down_proj.data.copy_(values[f"{p}.down_proj"])


@pytest.fixture(scope="module", params=GGUF_CASES)
def pair(request, tmp_path_factory):
    model_type, cfg, _ = CASES[request.param]
    d = make_hf_checkpoint(tmp_path_factory.mktemp(request.param), model_type, **cfg)
    return hf_model(d), GGUFCheckpoint(write_gguf(d, d / "model.gguf"))


def runner(ckpt, spec: str = "f", **kw) -> LocalRunner:
    config = load_config(ckpt.config_dict())
    return LocalRunner([build_slice(ckpt, spec, config=config, **kw)], config)


def test_gguf_matches_transformers(pair) -> None:
    hf, ckpt = pair
    assert ckpt.config_dict()["model_type"] == hf.config.model_type
    prompt = tokens(2, 6, seed=4)
    ours, logits = greedy(runner(ckpt), prompt, STEPS)
    with torch.no_grad():
        ref = hf.generate(prompt, do_sample=False, max_new_tokens=STEPS, min_new_tokens=STEPS,
                          pad_token_id=0)  # fmt: skip
        ref_logits = hf(ref[:, :-1]).logits
    assert ours.tolist() == ref[:, 6:].tolist()
    assert (logits - ref_logits).abs().max().item() < TOL


def test_slice_reads_only_its_experts(pair) -> None:
    _, ckpt = pair
    read = []
    load = ckpt.load
    ckpt.load = lambda name, *a, **k: read.append(name) or load(name, *a, **k)
    try:
        runner(ckpt, "b 0-1")
    finally:
        del ckpt.load
    assert read and all(n.startswith(("model.layers.0.", "model.embed")) for n in read)
    experts = [n for n in read if ".experts." in n]
    if experts:  # each expert read alone, as rows of the stacked tensor
        stacked = ckpt.tensor_nbytes(experts[0]) * ckpt.config_dict()["num_experts"]
        assert stacked == ckpt._gguf["blk.0.ffn_gate_exps.weight"].n_bytes


@pytest.fixture(scope="module")
def q8_moe(tmp_path_factory):
    model_type, cfg, _ = CASES["qwen2_moe-stacked"]
    cfg = dict(cfg, moe_intermediate_size=32)  # whole blocks of 32 in every expert row
    d = make_hf_checkpoint(tmp_path_factory.mktemp("q8"), model_type, **cfg)
    values: dict = {}
    ckpt = GGUFCheckpoint(write_gguf(d, d / "q8.gguf", dict.fromkeys(LEAVES, QType.Q8_0), values))
    hf = hf_model(d)
    with_experts(hf, values)
    return hf, ckpt


def test_q8_experts_on_block_kernels(q8_moe) -> None:
    """Q8_0 experts: dequantized (--exact) equal transformers on the same values; by default
    held as blocks for our kernel (int8 activations, as llama.cpp), close to it."""
    hf, ckpt = q8_moe
    toks = tokens(2, 9, seed=5)
    with torch.no_grad():
        ref = hf(toks).logits
    exact, fast = runner(ckpt), runner(ckpt, fast=True)
    assert forms(fast.slices[0])["blocks"] >= 2 * 8  # every layer's experts, gate/up fused
    out = {}
    for name, r in (("exact", exact), ("fast", fast)):
        out[name] = r.forward(toks, positions(2, 0, 9), r.new_cache(2, 9))
    assert (out["exact"] - ref).abs().max().item() < TOL
    assert (out["fast"] - ref).abs().max().item() < 0.1 * ref.abs().max().item()


def random_k(qtype: QType, experts: int, rows: int, cols: int, seed: int) -> np.ndarray:
    """Valid K-quant bytes (gguf-py cannot quantize to them) of weights about 0.05 in size."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(experts * rows * cols // block, size), dtype=np.uint8)
    if qtype == QType.Q4_K:  # d, dmin (fp16) lead; 6-bit scales and mins follow
        raw[:, 0:4] = np.full((raw.shape[0], 2), 4e-4, np.float16).view(np.uint8)
    else:  # Q6_K: int8 scales, then d closes the block
        raw[:, 192:208] = (
            rng.integers(-40, 40, size=(raw.shape[0], 16)).astype(np.int8).view(np.uint8)
        )
        raw[:, 208:210] = np.full((raw.shape[0], 1), 1e-4, np.float16).view(np.uint8)
    out = raw.reshape(experts, rows, -1)
    QTYPE_OF[id(out)] = qtype
    return out


def test_k_quant_experts(tmp_path) -> None:
    """Q4_K gate/up and Q6_K down experts (widths of 256-value blocks), dequantized on load."""
    cfg = dict(BASE, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
               num_experts=4, num_experts_per_tok=2, moe_intermediate_size=256,
               norm_topk_prob=True, num_hidden_layers=1)  # fmt: skip
    d = make_hf_checkpoint(tmp_path, "qwen3_moe", **cfg)
    kinds = {
        "gate_proj": random_k(QType.Q4_K, 4, 256, 256, 1),
        "up_proj": random_k(QType.Q4_K, 4, 256, 256, 2),
        "down_proj": random_k(QType.Q6_K, 4, 256, 256, 3),
    }
    values: dict = {}
    ckpt = GGUFCheckpoint(write_gguf(d, d / "k.gguf", kinds, values))
    assert ckpt.block_type("model.layers.0.mlp.experts.3.down_proj.weight") == "Q6_K"
    hf = hf_model(d)
    with_experts(hf, values)
    assert hf.model.layers[0].mlp.experts.down_proj.std() > 0.01
    toks = tokens(2, 7, seed=6)
    with torch.no_grad():
        ref = hf(toks).logits
    r = runner(ckpt, fast=True)
    out = r.forward(toks, positions(2, 0, 7), r.new_cache(2, 7))
    assert (out - ref).abs().max().item() < TOL

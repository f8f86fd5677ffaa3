"""Checkpoint reading: only a slice's tensors are read, shards, part specs, clear errors."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from conftest import LLAMA_TINY, hf_model, make_hf_checkpoint
from safetensors.torch import load_file, save_file

from layercake.checkpoint import open_checkpoint
from layercake.config import load_config
from layercake.errors import LayercakeError
from layercake.models.build import build_slice
from layercake.models.parts import Parts, parse_parts
from layercake.runner import LocalRunner


def _run(runner: LocalRunner, tokens: torch.Tensor) -> torch.Tensor:
    B, T = tokens.shape
    cache = runner.new_cache(B, T)
    return runner.forward(tokens, torch.arange(T).expand(B, T), cache)


def _header(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), 8 + n


def test_parse_parts():
    assert parse_parts("f", 4) == Parts(True, (0, 1, 2, 3), True)
    assert parse_parts("b 0-2", 4) == Parts(True, (0, 1), False)
    assert parse_parts("2-4 e", 4) == Parts(False, (2, 3), True)
    assert parse_parts("0-1 3-4", 4) == Parts(False, (0, 3), False)
    assert parse_parts("2", 4).layers == (2,)
    assert str(parse_parts("b 0-1 3-4 e", 4)) == "b 0-1 3-4 e"
    for bad in ["", "0-5", "2-1", "x", "0-2 1-3", "f b"]:
        with pytest.raises(LayercakeError):
            parse_parts(bad, 4)


def test_slice_reads_only_its_tensors(tiny_llama, tmp_path):
    """Overwrite every tensor the slice does not hold with NaN: the slice still loads and gives
    the same hidden states, so it never read those bytes."""
    ref_ckpt = open_checkpoint(tiny_llama)
    config = load_config(ref_ckpt.config_dict())
    ref = build_slice(ref_ckpt, "1-2", config=config, compiled=True)  # plain parameters

    bad = tmp_path / "poisoned"
    shutil.copytree(tiny_llama, bad)
    f = bad / "model.safetensors"
    header, base = _header(f)
    data = bytearray(f.read_bytes())
    kept = [n for n in header if n.startswith("model.layers.1.")]
    for name, e in header.items():
        if name == "__metadata__" or name in kept:
            continue
        lo, hi = e["data_offsets"]
        data[base + lo : base + hi] = b"\xff" * (hi - lo)  # NaN in fp32
    f.write_bytes(bytes(data))

    ckpt = open_checkpoint(bad)
    part = build_slice(ckpt, "1-2", config=config, compiled=True)
    assert {n for n, _ in part.named_parameters()} == {n for n in kept}
    h = torch.randn(2, 5, config.hidden_size)
    outs = []
    for m in (ref, part):
        r = LocalRunner([m], config)
        cache = r.new_cache(2, 5)
        step = cache.begin(torch.ones(2, 5, dtype=torch.bool))
        outs.append(m(h, torch.arange(5).expand(2, 5), cache, step))
    assert torch.isfinite(outs[1]).all()
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    # and the full model from the poisoned file really is poisoned (the test can fail)
    full = LocalRunner([build_slice(ckpt, "f", config=config)], config)
    assert not torch.isfinite(_run(full, torch.tensor([[1, 2, 3]]))).all()


def test_sharded_checkpoint_and_bf16_embedding(tmp_path):
    """A two-shard bf16 checkpoint with an index: same logits as transformers, the embedding
    table stays a bf16 view (upcast on lookup), and only the needed shard is opened."""
    src = make_hf_checkpoint(tmp_path / "src", "llama", **LLAMA_TINY)
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(src / "model.safetensors").items()}
    d = tmp_path / "sharded"
    d.mkdir()
    first = {k: v for k, v in tensors.items() if k.startswith("model.layers.0.")}
    rest = {k: v for k, v in tensors.items() if k not in first}
    save_file(first, d / "a.safetensors", metadata={"format": "pt"})
    save_file(rest, d / "b.safetensors", metadata={"format": "pt"})
    wm = {**dict.fromkeys(first, "a.safetensors"), **dict.fromkeys(rest, "b.safetensors")}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    cfg = json.loads((src / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg))

    ckpt = open_checkpoint(d)
    config = load_config(ckpt.config_dict())
    m = build_slice(ckpt, "b 0-1", config=config)
    assert set(ckpt._files) == {"a.safetensors", "b.safetensors"}  # embeddings live in b
    m2 = build_slice(open_checkpoint(d), "0-1", config=config)
    assert m2 is not None
    ck2 = open_checkpoint(d)
    build_slice(ck2, "0-1", config=config)
    assert set(ck2._files) == {"a.safetensors"}  # layer 0 only: shard b never opened
    assert m.model.embed_tokens.weight.dtype == torch.bfloat16
    assert m.model.layers["0"].mlp.gate_up_proj.weight.form == "mkl"  # fp32, packed

    full = LocalRunner([build_slice(ckpt, "f", config=config)], config)
    hf = hf_model(d)  # transformers reads the same bf16 shards into fp32
    tokens = torch.randint(0, LLAMA_TINY["vocab_size"], (2, 9))
    with torch.no_grad():
        ref = hf(tokens).logits
    torch.testing.assert_close(_run(full, tokens), ref, rtol=0, atol=1e-4)


def test_packed_linears_match(tiny_llama):
    from layercake.ops.linear import Linear, forms
    from layercake.ops.mkl import packing_available

    if not packing_available():
        pytest.skip("MKL packed GEMM not available in this PyTorch")
    ckpt = open_checkpoint(tiny_llama)
    config = load_config(ckpt.config_dict())
    plain = LocalRunner([build_slice(ckpt, "f", config=config, compiled=True)], config)
    assert set(forms(plain.slices[0])) == {"dense"}
    packed_model = build_slice(ckpt, "f", config=config)
    # q/k/v and gate/up fused: 4 linears a layer, and the head
    assert forms(packed_model) == {"mkl": 3 * 4 + 1}
    assert isinstance(packed_model.lm_head, Linear)
    c = config
    qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    assert packed_model.model.layers["0"].self_attn.qkv_proj.weight.shape == (qkv, c.hidden_size)
    packed = LocalRunner([packed_model], config)
    for B in (1, 3):
        tokens = torch.randint(0, LLAMA_TINY["vocab_size"], (B, 6))
        torch.testing.assert_close(_run(packed, tokens), _run(plain, tokens), rtol=0, atol=1e-4)


def test_packed_linear_slabs_and_bias(monkeypatch):
    """Weights packed in several row slabs (a bf16 source through the scratch buffer, with a
    bias) equal the plain linear."""
    from layercake.ops import mkl as cpu_linear

    if not cpu_linear.packing_available():
        pytest.skip("MKL packed GEMM not available in this PyTorch")
    monkeypatch.setattr(cpu_linear, "SLAB_BYTES", 4 * 24 * 10)  # 10 rows of 24 per slab
    w = torch.randn(37, 24).to(torch.bfloat16)
    b = torch.randn(37)
    m = cpu_linear.MKLPacked(w, torch.empty(240))
    assert len(m.slabs) == 4
    for shape in [(1, 24), (5, 24), (2, 3, 24)]:
        x = torch.randn(shape)
        ref = torch.nn.functional.linear(x, w.float(), b)
        torch.testing.assert_close(m.linear(x, b), ref, rtol=0, atol=1e-5)


def _expect_error(path, match):
    with pytest.raises(LayercakeError, match=match):
        ckpt = open_checkpoint(path)
        build_slice(ckpt, "f")


def test_checkpoint_errors(tiny_llama, tmp_path):
    _expect_error(tmp_path / "nope", "not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    _expect_error(empty, "no config.json")
    (empty / "config.json").write_text(json.dumps({"model_type": "llama"}))
    _expect_error(empty, "no weights")

    bad_type = tmp_path / "gpt"
    shutil.copytree(tiny_llama, bad_type)
    cfg = json.loads((bad_type / "config.json").read_text())
    (bad_type / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_bigcode"}))
    _expect_error(bad_type, "model_type = 'gpt_bigcode' is invalid: supported: falcon, llama")

    trunc = tmp_path / "trunc"
    shutil.copytree(tiny_llama, trunc)
    f = trunc / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    _expect_error(trunc, "truncated or corrupt")
    f.write_bytes(b"\x05\x00")
    _expect_error(trunc, "truncated")
    f.write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\x00" * 64)
    _expect_error(trunc, "corrupt")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(tiny_chat_llama):
    import layercake

    cpu = layercake.load(tiny_chat_llama)
    gpu = layercake.load(tiny_chat_llama, device="cuda", dtype="float32")
    ids = [[5, 6, 7, 8], [9, 10]]
    torch.testing.assert_close(gpu.logits(ids).cpu(), cpu.logits(ids), rtol=0, atol=1e-3)
    assert (
        gpu.generate(ids, max_new_tokens=5)[0].token_ids
        == cpu.generate(ids, max_new_tokens=5)[0].token_ids
    )

"""Compression: quantize/dequantize error bounds, GGUF blocks kept exactly, quantized models
against the same model with fake-quantized weights (transformers), compressed KV cache,
perplexity, options and errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import layercake
from layercake.errors import LayercakeError
from layercake.ops.linear import forms
from layercake.quant import (
    QTensor,
    QuantSpec,
    dequantize,
    from_gguf,
    quantize,
    quantize_rows,
)

TEXT = Path(__file__).resolve().parents[1] / "benchmarks/data/gettysburg.txt"


def _groups(x: torch.Tensor, G: int) -> torch.Tensor:
    return x.unflatten(-1, (x.shape[-1] // G, G))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64])
def test_error_is_at_most_half_a_step_per_group(bits, group):
    g = torch.Generator().manual_seed(bits * group)
    # groups of very different ranges, an outlier, a constant group, negative-only values
    x = torch.randn(37, 256, generator=g) * torch.logspace(-3, 2, 256 // group).repeat_interleave(
        group
    )
    x[3, 5] = 500.0
    x[7, :group] = 0.25
    x[9] = -x[9].abs() - 1
    q = quantize(x, bits, group)
    y = dequantize(q)
    xg, yg = _groups(x, group), _groups(y, group)
    lo, hi = xg.amin(-1), xg.amax(-1)
    levels = 2**bits - 1
    # the stored scale and zero are the group's (max - min) / levels and min, in fp16
    torch.testing.assert_close(q.scale.float(), (hi - lo) / levels, rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(q.zero.float(), lo, rtol=1e-3, atol=1e-7)
    step = q.scale.float()[..., None]
    fp16_slack = 2e-3 * torch.maximum(lo.abs(), hi.abs())[..., None]  # rounding of scale, zero
    assert ((yg - xg).abs() <= step / 2 + fp16_slack).all()
    assert torch.equal(y[7, :group], x[7, :group])  # a constant group comes back exactly
    # and the error really is of that order: not a fluke of a loose bound
    assert ((yg - xg).abs() / step.clamp(min=1e-30)).amax() > 0.4


def test_layout_sizes_and_other_dims():
    x = torch.randn(8, 3, 128)
    q4, q8 = quantize(x, 4, 64), quantize(x, 8, 64)
    assert q4.data.shape == (8, 3, 64) and q4.data.dtype == torch.uint8
    assert q4.scale.shape == (8, 3, 2) and q4.scale.dtype == torch.float16
    assert q4.nbytes / (x.numel() * 2) == pytest.approx(0.28125)  # int4 g64 vs bf16
    assert q8.nbytes / (x.numel() * 2) == pytest.approx(0.53125)
    # groups along another dimension: the result is laid out with that dimension last
    qd = quantize(x, 8, 8, dim=0)
    assert qd.shape == (3, 128, 8)
    torch.testing.assert_close(dequantize(qd).movedim(-1, 0), x, atol=0.05, rtol=0)


def test_dequantize_into_preallocated_buffers():
    x = torch.randn(64, 128)
    q = quantize(x, 4, 64)
    want = dequantize(q)
    out = torch.empty(64, 128)
    assert dequantize(q, out).data_ptr() == out.data_ptr()
    assert torch.equal(out, want)
    big = torch.zeros(64, 256)  # a strided view, as a scratch slice or a cache window is
    dequantize(q, big[:, 64:192])
    assert torch.equal(big[:, 64:192], want) and not big[:, :64].any()
    # bf16 (a GPU's compute dtype): two bf16 roundings of values up to ~4
    torch.testing.assert_close(dequantize(q, dtype=torch.bfloat16).float(), want, rtol=0,
                               atol=0.05)  # fmt: skip
    with pytest.raises(LayercakeError, match="out is"):
        dequantize(q, torch.empty(64, 64))


def test_row_layout_round_trip_and_row_ranges():
    x = torch.randn(50, 192)
    spec = QuantSpec(4, 64)
    rows = quantize_rows(x.bfloat16(), spec)
    assert rows.shape == (50, spec.row_bytes(192)) and rows.shape[1] == 96 + 12
    full = dequantize(QTensor.from_rows(rows, (50, 192), spec))
    torch.testing.assert_close(full, dequantize(quantize(x.bfloat16(), 4, 64)))
    # any row range is a contiguous byte range and dequantizes on its own
    part = dequantize(QTensor.from_rows(rows[17:31], (14, 192), spec))
    assert torch.equal(part, full[17:31])


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_convert_without_float_round_trip(qtype):
    import gguf

    x = torch.randn(24, 256).numpy()
    kind = getattr(gguf.GGMLQuantizationType, qtype)
    blocks = gguf.quants.quantize(x, kind)
    want = torch.from_numpy(gguf.quants.dequantize(blocks, kind))
    rows, spec = from_gguf(torch.from_numpy(blocks), qtype)
    assert spec.group_size == 32 and spec.bits == (8 if qtype == "Q8_0" else 4)
    assert rows.numel() == blocks.size + (24 * 8 * 2 if qtype != "Q4_1" else 0)  # + zeros
    assert torch.equal(dequantize(QTensor.from_rows(rows, (24, 256), spec)), want)


# ---- models ---------------------------------------------------------------------------------
def _fake_quantized_hf(path: Path, bits: int, group: int):
    """transformers' model with every linear weight replaced by its dequantized values (the
    head's at 8 bits, one group per row, under 4-bit weights)."""
    from conftest import hf_model

    m = hf_model(path)
    with torch.no_grad():
        for name, mod in m.named_modules():
            if isinstance(mod, torch.nn.Linear):
                b, g = bits, group
                if name == "lm_head" and bits == 4:
                    b, g = 8, mod.weight.shape[1]
                mod.weight.copy_(dequantize(quantize(mod.weight, b, g)))
    return m


PROMPT = [[1, 5, 9, 2, 33, 7, 8, 60, 4, 11]]


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_model_equals_fake_quantized_transformers(tiny_llama, bits):
    ref = _fake_quantized_hf(tiny_llama, bits, 16)(torch.tensor(PROMPT)).logits
    llm = layercake.load(tiny_llama, compress_weight=True, compress_bits=bits, group_size=16)
    kinds = set(forms(llm.runner.slices[0]))
    assert "dequant" in kinds  # the layers (48 rows: not whole blocks for the int4 kernel)
    if bits == 8:
        torch.testing.assert_close(llm.logits(PROMPT), ref, rtol=1e-4, atol=1e-4)
    else:  # the int8 head runs on the int8 kernel: bf16 activations and results
        assert "int8row" in kinds
        assert (llm.logits(PROMPT) - ref).norm() / ref.norm() < 5e-3
    # and close to the uncompressed model: int8 within a few percent of the logits' range
    plain = layercake.load(tiny_llama).logits(PROMPT)
    err = (llm.logits(PROMPT) - plain).abs().max() / plain.abs().max()
    assert err < (0.05 if bits == 8 else 0.6)


@pytest.mark.parametrize("bits,tol", [(8, 0.02), (4, 0.3)])
def test_compressed_cache_close_and_smaller(tiny_llama, bits, tol):
    from layercake.kv_cache import QuantKV

    plain = layercake.load(tiny_llama)
    llm = layercake.load(tiny_llama, compress_cache=True, compress_bits=bits)
    ids = [[1, 2, 3, 4, 5, 6], [7, 8, 9]]
    ref = plain.logits(ids)
    err = (llm.logits(ids) - ref).abs().max() / ref.abs().max()
    assert 0 < err < tol
    cache = llm.runner.new_cache(2, 32)
    k = cache.keys[0]
    assert isinstance(k, QuantKV) and k.spec.group_size == 12  # head_dim 12 < 64: one group
    held = sum(t.numel() * t.element_size() for t in k.parts())
    fp32 = 2 * 2 * 32 * 12 * 4  # (B, n_kv, T, head_dim) fp32
    assert held == fp32 * (12 * bits // 8 + 4) // (12 * 4)  # a third (int8), a fifth (int4)
    # generation (cache reads after the prompt) and dropping finished rows work
    out = llm.generate(ids, max_new_tokens=4)
    assert all(len(r.token_ids) == 4 for r in out)


def test_gguf_q4_1_weights_kept_as_stored():
    """SmolLM2's Q4_1 matrices are kept in their own form (repacked for the int4 CPU kernel
    without a float round trip), the Q8_0 head as it is: 4x fewer bytes, the same values."""
    from layercake.ops.linear import Linear

    plain = layercake.load(exact=True)
    llm = layercake.load(compress_weight=True, exact=True)  # PyTorch's int4 kernel, not blocks
    model = llm.runner.slices[0]
    assert forms(model) == {"int4pack": 4 * 30, "dequant": 1}  # q/k/v and gate/up fused
    packed = [m for m in model.modules() if isinstance(m, Linear) and m.weight.form == "int4pack"]
    assert all(m.weight.group_size == 32 for m in packed)
    assert model.lm_head.weight.spec == QuantSpec(8, 32)  # the tied head: the Q8_0 embedding's
    # the values are the checkpoint's: one matrix against its expanded fp32 weight
    up = plain.runner.slices[0].get_submodule("model.layers.3.mlp.gate_up_proj")
    x = torch.randn(4, 576)
    ref = up(x)
    got = llm.runner.slices[0].get_submodule("model.layers.3.mlp.gate_up_proj")(x)
    assert ((got - ref).norm() / ref.norm()) < 5e-3  # bf16 activations and results
    ids = [plain.tokenizer.encode("The capital of France is")]
    a, b = llm.logits(ids), plain.logits(ids)
    assert ((a - b).norm() / b.norm()) < 5e-2  # perplexity: +0.1 % (benchmarks/quality.py)
    assert torch.equal(a[0, -1].argmax(), b[0, -1].argmax())


def test_perplexity_matches_direct_cross_entropy(tiny_llama):
    from layercake.eval import perplexity

    llm = layercake.load(tiny_llama)
    ids = torch.randint(0, 97, (60,), generator=torch.Generator().manual_seed(0)).tolist()
    logits = llm.logits([ids])[0]
    want = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).exp().item()
    for chunk in (7, 60):
        r = perplexity(llm.runner, ids, window=128, stride=64, chunk=chunk)
        assert r.tokens == 59 and r.ppl == pytest.approx(want, rel=1e-4)
    strided = perplexity(llm.runner, ids, window=16, stride=8, chunk=5)
    assert strided.tokens == 59 and strided.ppl != pytest.approx(want, rel=1e-4)


def test_public_domain_text_is_shipped():
    assert TEXT.read_text().startswith("Four score and seven years ago")


# ---- options and errors ---------------------------------------------------------------------
def test_unsupported_combinations_are_clear_errors(tiny_llama):
    with pytest.raises(LayercakeError, match="4 or 8"):
        layercake.load(tiny_llama, compress_weight=True, compress_bits=3)
    with pytest.raises(LayercakeError, match="multiple of 4"):
        layercake.load(tiny_llama, compress_weight=True, group_size=6)
    with pytest.raises(LayercakeError, match="does not divide"):
        layercake.load(tiny_llama, compress_weight=True, group_size=32)  # hidden 48
    with pytest.raises(LayercakeError, match="head_dim"):
        layercake.load(tiny_llama, compress_cache=True, group_size=8)  # head_dim 12
    with pytest.raises(LayercakeError, match="need --compress-weight or --compress-cache"):
        layercake.load(tiny_llama, compress_bits=8)
    with pytest.raises(LayercakeError, match="--compile"):
        layercake.load(tiny_llama, compress_weight=True, group_size=16, compile=True)
    with pytest.raises(LayercakeError, match="--topology"):  # before any topology file is read
        layercake.load(tiny_llama, compress_cache=True, topology="no-such-topology.json")


def test_cli_help_and_errors(tiny_llama, capsys):
    from layercake.cli import build_parser, main

    text = build_parser()._subparsers._group_actions[0].choices["generate"].format_help()
    text = " ".join(text.split())  # as wrapped for the terminal's width
    assert (
        "--compress-weight" in text and "--compress-cache" in text and "not with --compile" in text
    )
    code = main(["generate", "--model", str(tiny_llama), "--prompt", "x", "--compress-weight",
                 "--compress-bits", "5"])  # fmt: skip
    assert code == 2 and "4 or 8" in capsys.readouterr().err

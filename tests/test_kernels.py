"""layercake's own CPU kernels: block matmul on int4/int8 blocks, one-query attention and the
bf16-weight matmul, against plain PyTorch on the same values."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from layercake.kv_cache import AttentionStep
from layercake.ops import kernels
from layercake.ops.blocks import Blocks, from_blocks, takes, to_blocks
from layercake.ops.linear import Linear as Int4Linear
from layercake.quant import QTensor, QuantSpec, dequantize, from_gguf, quantize

pytestmark = pytest.mark.skipif(
    not kernels.available(), reason=f"no CPU kernels here: {kernels.unavailable_reason()}"
)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def quantized_x(x: torch.Tensor) -> torch.Tensor:
    """The activations as the kernel sees them: int8 per block of 32, scale max|x| / 127."""
    xb = x.view(x.shape[0], -1, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, 0.0)
    return (torch.round(xb * inv) * (amax / 127)).view_as(x)


@pytest.mark.parametrize("bits,group", [(4, 32), (8, 32), (8, 64), (8, 96)])
def test_blocks_hold_the_quantized_values(bits, group):
    """4 bits: exactly. 8 bits: the offset ``zero + 128 scale`` is rounded to fp16, an error of
    at most 2^-11 of it (a few % of a step for groups far from zero; 0 for GGUF Q8_0)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 192, generator=g) + torch.linspace(-3, 3, 40)[:, None]
    q = quantize(w, bits, group)
    got, want = from_blocks(to_blocks(q), bits), dequantize(q)
    if bits == 4:
        assert torch.equal(got, want)
    else:
        scale = q.scale.float().repeat_interleave(group, -1)
        offset = q.zero.float().repeat_interleave(group, -1) + 128 * scale
        assert ((got - want).abs() <= offset.abs() * 2**-11 + 1e-6).all()
        assert ((got - want).abs() <= 0.1 * scale).all()


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_move_exactly(qtype):
    import gguf

    w = (torch.randn(64, 128, generator=torch.Generator().manual_seed(1)) * 0.05).numpy()
    kind = getattr(gguf.GGMLQuantizationType, qtype)
    raw = gguf.quants.quantize(w, kind)
    want = torch.from_numpy(gguf.quants.dequantize(raw, kind)).float()
    rows, spec = from_gguf(torch.from_numpy(raw), qtype)
    blocks = to_blocks(QTensor.from_rows(rows, (64, 128), spec))
    assert torch.equal(from_blocks(blocks, spec.bits), want)


# K: an odd number of blocks (alone at the end), one block, even; M: 1..4 rows a pass and tails
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("K", [32, 96, 544, 576])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 9, 33])
def test_block_mm_equals_the_dequantized_matmul(bits, K, M):
    g = torch.Generator().manual_seed(K + M + bits)
    N = 37  # not a multiple of the kernel's row chunks
    q = quantize(torch.randn(N, K, generator=g), bits, 32)
    blocks = to_blocks(q)
    W = from_blocks(blocks, bits)
    x = torch.randn(M, K, generator=g) * torch.rand(M, 1, generator=g) * 4
    y = kernels.block_mm(x, blocks, bits)
    # exactly the dequantized weights times the int8-rounded activations (fp32 sums)
    torch.testing.assert_close(y, quantized_x(x) @ W.T, rtol=1e-4, atol=1e-4)
    assert rel(y, x @ W.T) < 1.5e-2  # and close to the unrounded product


def test_block_mm_zero_rows_and_bad_shapes():
    q = quantize(torch.randn(8, 64), 4, 32)
    blocks = to_blocks(q)
    assert torch.equal(kernels.block_mm(torch.zeros(2, 64), blocks, 4), torch.zeros(2, 8))
    with pytest.raises(RuntimeError, match="shapes do not match"):
        kernels.block_mm(torch.zeros(1, 96), blocks, 4)
    with pytest.raises(RuntimeError, match="bits must be 4 or 8"):
        kernels.block_mm(torch.zeros(1, 64), blocks, 5)


def test_block_linear_bias_and_leading_dims():
    g = torch.Generator().manual_seed(3)
    q = quantize(torch.randn(48, 64, generator=g), 4, 32)
    bias = torch.randn(48, generator=g)
    lin = Int4Linear(Blocks.from_quantized(q), bias)
    x = torch.randn(2, 3, 64, generator=g)
    y = lin(x)
    assert y.shape == (2, 3, 48)
    ref = F.linear(quantized_x(x.view(6, 64)), dequantize(q), bias).view(2, 3, 48)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


def test_takes():
    assert takes((64, 64), QuantSpec(4, 32)) and takes((64, 128), QuantSpec(8, 128))
    assert not takes((64, 128), QuantSpec(4, 64))  # 4-bit blocks are groups of 32
    assert not takes((64, 48), QuantSpec(8, 16))
    assert not takes((64, 64), QuantSpec(4, 32), "meta")


@pytest.mark.parametrize("B,H,KV,S", [(1, 9, 3, 40), (3, 4, 4, 7), (2, 8, 2, 300)])
def test_decode_attention_equals_sdpa(B, H, KV, S):
    g = torch.Generator().manual_seed(B * S)
    D = 64
    q = torch.randn(B, H, D, generator=g)
    k, v = torch.randn(B, KV, S, D, generator=g), torch.randn(B, KV, S, D, generator=g)
    mask = torch.rand(B, S, generator=g) < 0.7
    mask[:, -1] = True
    got = kernels.decode_attention(q, k, v, mask, D**-0.5)
    ref = F.scaled_dot_product_attention(
        q[:, :, None], k, v, attn_mask=mask[:, None, None], enable_gqa=True
    )[:, :, 0]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # a strided view of a longer cache (the eager decode step's first slots)
    big = torch.zeros(B, KV, S + 16, D)
    big[:, :, :S] = k
    bigv = torch.zeros(B, KV, S + 16, D)
    bigv[:, :, :S] = v
    got2 = kernels.decode_attention(q, big[:, :, :S], bigv[:, :, :S], mask, D**-0.5)
    torch.testing.assert_close(got2, got)


@pytest.mark.parametrize("M", [1, 4, 5, 7, 13])
@pytest.mark.parametrize("N,K", [(1, 8), (4, 20), (97, 96), (130, 1030), (7, 4107)])
def test_bf16_mm_equals_fp32_matmul(M, N, K):
    """Tiles of 4 rows x 3 weight rows, K in blocks of 4096 with a tail not a multiple of 8, row
    chunks of 96: every edge."""
    g = torch.Generator().manual_seed(M * N + K)
    w = torch.randn(N, K, generator=g).bfloat16()
    x = torch.randn(M, K, generator=g)
    torch.testing.assert_close(kernels.bf16_mm(x, w), x @ w.float().T, rtol=1e-5, atol=1e-4)


def test_bf16_linear_over_row_blocks():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(40, 64, generator=g).bfloat16()
    b = torch.randn(40, generator=g)
    x = torch.randn(2, 3, 64, generator=g)
    want = F.linear(x, w.float(), b)
    torch.testing.assert_close(kernels.bf16_linear(x, w, b), want, rtol=1e-5, atol=1e-5)
    blocks = [w[:7], w[7:30], w[30:]]  # rows held in three tiers
    torch.testing.assert_close(kernels.bf16_linear(x, blocks, b), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        kernels.bf16_mm(torch.zeros(1, 32), w)


@pytest.mark.parametrize("K", [64, 4100])
def test_bf16_mm_into_columns_of_a_wider_output(K):
    """``out=``: a range of columns of a wider tensor (the head's slabs write their logits in
    place). Every value is stored, not added to what was there (NaN before), columns outside
    stay as they were, and a second K block adds to the first. Over many row tasks (N = 1000,
    96 rows a task) handed out to the threads as they finish."""
    g = torch.Generator().manual_seed(K)
    w = torch.randn(1000, K, generator=g).bfloat16()
    x = torch.randn(6, K, generator=g)
    out = torch.full((6, 1300), float("nan"))
    kernels.bf16_mm(x, w, out=out[:, 100:1100])
    torch.testing.assert_close(out[:, 100:1100], x @ w.float().T, rtol=1e-5, atol=1e-3)
    assert out[:, :100].isnan().all() and out[:, 1100:].isnan().all()
    logits = torch.full((2, 3, 1200), float("nan"))  # bf16_linear over row blocks, in place
    xs = x[:6].view(2, 3, K)
    kernels.bf16_linear(xs, [w[:10], w[10:]], out=logits[..., 200:])
    torch.testing.assert_close(logits[..., 200:], xs @ w.float().T, rtol=1e-5, atol=1e-3)
    assert logits[..., :200].isnan().all()
    with pytest.raises(RuntimeError, match="unit column stride"):
        kernels.bf16_mm(x, w, out=torch.zeros(1000, 6).T)


def test_a_failed_build_says_why_and_falls_back(tmp_path):
    code = "from layercake.ops import kernels as k; print(k.available(), k.unavailable_reason())"
    env = {"CXX": "/nonexistent/c++", "LAYERCAKE_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("False") and "/nonexistent/c++" in r.stdout
    assert "CPU kernels unavailable" in r.stderr and "using PyTorch's" in r.stderr


def test_unavailable_kernels_fall_back(tmp_path):
    """With the kernels switched off, --packed runs on PyTorch's int4 kernel and SDPA."""
    code = (
        "from layercake.ops import kernels; import layercake, sys\n"
        "from layercake.ops.linear import forms\n"
        "assert not kernels.available(); print(kernels.unavailable_reason())\n"
        "llm = layercake.load(packed=True); f = forms(llm.runner.slices[0])\n"
        "assert 'blocks' not in f and f['int4pack'] > 0, f\n"
        "print(llm.generate(['Hi'], max_new_tokens=3, ignore_eos=True)[0].completion_tokens)\n"
    )
    env = {"LAYERCAKE_NO_KERNELS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["LAYERCAKE_NO_KERNELS", "is", "set", "3"]


def test_cached_attention_runs_a_decode_step_on_the_kernel(monkeypatch):
    """The engine's one-token steps (fp32, CPU) attend with ``decode_attention``, not SDPA, and
    give what SDPA gives: GQA, padding slots masked, the new token written into the cache."""
    from layercake.kv_cache import attention_mask
    from layercake.models import layers

    B, H, KV, D, S = 3, 8, 2, 16, 12
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(B, n, 1, D, generator=g) for n in (H, KV, KV))
    valid = torch.ones(B, S + 1, dtype=torch.bool)
    valid[0, :4] = False  # a left-padded row
    step = AttentionStep(S, S + 1, attention_mask(valid, S))
    cache = [torch.randn(B, KV, S + 4, D, generator=g) for _ in range(2)]
    calls = []
    real = kernels.decode_attention
    monkeypatch.setattr(kernels, "decode_attention", lambda *a: calls.append(1) or real(*a))
    ck, cv = (c.clone() for c in cache)
    got = layers.cached_attention(q, k, v, ck, cv, step)
    assert calls and torch.equal(ck[:, :, S], k[:, :, 0])
    monkeypatch.setattr(layers, "_own_decode_attention", lambda *a: False)
    want = layers.cached_attention(q, k, v, *(c.clone() for c in cache), step)
    assert len(calls) == 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

"""layercake's own CPU kernels: block matmul on int4/int8 blocks, one-query attention and the
bf16-weight matmul, against plain PyTorch on the same values."""

import contextlib

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


# K: an odd number of blocks, one block, even; M: every row count of a pass (up to 8 rows on
# AVX-512, 4 on AVX2) and tails
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("K", [32, 96, 544, 576])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 6, 7, 8, 9, 33])
def test_block_mm_equals_the_dequantized_matmul(bits, K, M):
    g = torch.Generator().manual_seed(K + M + bits)
    N = 37  # not a multiple of the kernel's panels of weight rows (16 or 8)
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


def sdpa(q, k, v, mask):
    m = mask.reshape(q.shape[0], 1, 1, -1)
    out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=m, enable_gqa=True)
    return out[:, :, 0]


@pytest.mark.parametrize("D", [1, 3, 5, 12, 20])
def test_decode_attention_any_head_dim_and_fully_masked_rows(D):
    """head_dim not a multiple of 8 (the vector loop's tail), and rows with every slot masked:
    zeros, as SDPA gives from PyTorch 2.5 on (not a softmax's NaN), the other rows unchanged."""
    B, H, KV, S = 3, 6, 2, 37
    g = torch.Generator().manual_seed(D)
    q = torch.randn(B, H, D, generator=g)
    k, v = torch.randn(B, KV, S, D, generator=g), torch.randn(B, KV, S, D, generator=g)
    mask = torch.rand(B, S, generator=g) < 0.5
    mask[:, 0] = True
    got = kernels.decode_attention(q, k, v, mask, D**-0.5)
    torch.testing.assert_close(got, sdpa(q, k, v, mask), rtol=1e-5, atol=1e-5)
    mask[1] = False  # row 1 attends to nothing
    masked = kernels.decode_attention(q, k, v, mask.view(B, 1, 1, S), D**-0.5)
    assert torch.equal(masked[1], torch.zeros(H, D))
    assert torch.equal(masked[[0, 2]], got[[0, 2]])


def _attention_args(B=2, H=4, KV=2, S=5, D=8):
    return [torch.randn(B, H, D), torch.randn(B, KV, S, D), torch.randn(B, KV, S, D),
            torch.ones(B, S, dtype=torch.bool)]  # fmt: skip


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: [a[0], a[1][:, :0], a[2][:, :0], a[3]], "at least one KV head"),
        (lambda a: _attention_args(H=5), "5 query heads are not a multiple of 2 KV heads"),
        (lambda a: [a[0][..., :6], *a[1:]], "shapes do not match"),
        (lambda a: [a[0][:1], *a[1:3], a[3][:1]], "shapes do not match"),
        (lambda a: [a[0], a[1], a[2][:, :, :4], a[3]], "keys, values"),
        (lambda a: [a[0], a[1][0], a[2][0], a[3]], r"q must be \(B, H, D\)"),
        (lambda a: [*a[:3], a[3][:, :4]], "mask must hold"),
        (lambda a: [*a[:3], a[3].T.contiguous()], "mask must hold"),  # (S, B)
        (lambda a: [*a[:3], a[3].int()], "bool mask"),
        (lambda a: [a[0].double(), *a[1:]], "float32 q, k, v"),
        (lambda a: [a[0], a[1].half(), *a[2:]], "float32 q, k, v"),
        (lambda a: [a[0], a[1].mT.contiguous().mT, *a[2:]], "unit stride in head_dim"),
        (lambda a: [a[0], a[1], torch.randn(2, 2, 5, 16)[..., ::2], a[3]], "unit stride"),
    ],
)
def test_decode_attention_rejects_bad_arguments(change, message):
    args = change(_attention_args())
    with pytest.raises(RuntimeError, match=f"decode_attention: .*{message}"):
        kernels.decode_attention(*args, 0.5)


F32, U8, BF = torch.float32, torch.uint8, torch.bfloat16
BAD_MATMULS = [  # (op, x shape, x dtype, w shape, w dtype, message)
    ("block_mm", (1, 64), torch.float64, (8, 40), U8, "block_mm: x must be 2-D float32"),
    ("block_mm", (64,), F32, (8, 40), U8, "block_mm: x must be 2-D float32"),
    ("block_mm", (1, 64), F32, (8, 40), torch.int8, "block_mm: w must be 2-D uint8"),
    ("block_mm", (1, 64), F32, (8, 72), U8, "block_mm: shapes do not match"),
    ("block_mm", (1, 48), F32, (8, 30), U8, "block_mm: shapes do not match"),
    ("bf16_mm", (1, 8), F32, (4, 8), F32, "bf16_mm: w must be 2-D bf16"),
    ("bf16_mm", (1, 8), BF, (4, 8), BF, "bf16_mm: x must be 2-D float32"),
    ("bf16_mm", (8,), F32, (4, 8), BF, "bf16_mm: x must be 2-D float32"),
    ("bf16_mm", (1, 8), F32, (4, 9), BF, "bf16_mm: shapes do not match"),
]


@pytest.mark.parametrize("op,xs,xt,ws,wt,message", BAD_MATMULS)
def test_matmuls_reject_bad_arguments(op, xs, xt, ws, wt, message):
    x, w = torch.zeros(xs, dtype=xt), torch.zeros(ws, dtype=wt)
    with pytest.raises(RuntimeError, match=message):
        kernels.block_mm(x, w, 4) if op == "block_mm" else kernels.bf16_mm(x, w)
    x, w = torch.zeros(1, 8), torch.zeros(4, 8, dtype=BF)
    for out in (torch.zeros(1, 4, dtype=torch.float64), torch.zeros(1, 5), torch.zeros(2, 4)):
        with pytest.raises(RuntimeError, match="bf16_mm_out: y must be float32"):
            kernels.bf16_mm(x, w, out=out)


@contextlib.contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_one_thread_gives_the_same_results():
    """On one thread the row tasks run in order on the caller (no parallel region); every
    output element is computed the same way, so the results are bit for bit the threads'."""
    g = torch.Generator().manual_seed(11)
    blocks = to_blocks(quantize(torch.randn(300, 576, generator=g), 4, 32))
    x = torch.randn(5, 576, generator=g)
    w = torch.randn(500, 4200, generator=g).bfloat16()
    xb = torch.randn(6, 4200, generator=g)
    q, k, v, mask = _attention_args(B=3, H=8, KV=2, S=300, D=20)
    mask[1, ::3] = False

    def run():
        return [kernels.block_mm(x, blocks, 4), kernels.bf16_mm(xb, w),
                kernels.decode_attention(q, k, v, mask, 0.3)]  # fmt: skip

    with threads(2):
        many = run()
    with threads(1):
        assert torch.get_num_threads() == 1
        one = run()
    for a, b in zip(one, many):
        assert torch.equal(a, b)
    torch.testing.assert_close(one[1], xb @ w.float().T, rtol=1e-5, atol=1e-3)


def test_weights_at_any_byte_offset():
    """Weights as views that do not start on their type's alignment: blocks at byte 1 of a
    uint8 buffer (their fp16 fields then at odd addresses), bf16 at an address 2 bytes past a
    32-byte boundary and, through ``torch.frombuffer``, at an odd one. Same results as aligned."""
    g = torch.Generator().manual_seed(12)
    for bits, K in ((4, 576), (4, 96), (8, 320)):  # 8 scales at once, and the one-by-one tail
        blocks = to_blocks(quantize(torch.randn(37, K, generator=g), bits, 32))
        buf = torch.empty(blocks.numel() + 1, dtype=torch.uint8)
        odd = buf[1:].view(blocks.shape)
        odd.copy_(blocks)
        assert odd.data_ptr() % 2 == 1 and odd.is_contiguous()
        x = torch.randn(3, K, generator=g)
        assert torch.equal(kernels.block_mm(x, odd, bits), kernels.block_mm(x, blocks, bits))
    w = torch.randn(40, 1030, generator=g).bfloat16()
    x = torch.randn(5, 1030, generator=g)
    want = kernels.bf16_mm(x, w)
    buf = torch.empty(w.numel() + 16, dtype=torch.bfloat16)
    start = next(i for i in range(16) if (buf.data_ptr() + 2 * i) % 32 == 2)
    w2 = buf[start : start + w.numel()].view_as(w)
    w2.copy_(w)
    assert w2.data_ptr() % 32 == 2
    assert torch.equal(kernels.bf16_mm(x, w2), want)
    raw = bytearray(w.numel() * 2 + 1)
    w1 = torch.frombuffer(raw, dtype=torch.bfloat16, offset=1, count=w.numel()).view_as(w)
    w1.copy_(w)
    assert w1.data_ptr() % 2 == 1
    assert torch.equal(kernels.bf16_mm(x, w1), want)


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


@pytest.mark.parametrize("shape", [(1, 576), (3, 5, 7), (40, 2048), (2, 1, 9)])
def test_rms_norm_equals_pytorch(shape):
    """Any row count and width (a tail shorter than a vector), non-contiguous input too."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g) * 3
    w = torch.randn(shape[-1], generator=g)
    want = torch.rms_norm(x, w.shape, w, 1e-5)
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-5), want, rtol=1e-5, atol=1e-6)
    xt = torch.randn(shape[-1], *shape[:-1], generator=g).movedim(0, -1)  # not contiguous
    torch.testing.assert_close(
        kernels.rms_norm(xt, w, 1e-6), torch.rms_norm(xt, w.shape, w, 1e-6), rtol=1e-5, atol=1e-6
    )


def test_rms_norm_rejects_bad_arguments():
    with pytest.raises(RuntimeError, match="rms_norm: weight must be"):
        kernels.rms_norm(torch.randn(2, 8), torch.ones(7), 1e-6)
    with pytest.raises(RuntimeError, match="rms_norm: float32"):
        kernels.rms_norm(torch.randn(2, 8).double(), torch.ones(8), 1e-6)


@pytest.mark.parametrize("B,H,KV,D,slot", [(1, 9, 3, 64, 0), (3, 4, 4, 12, 6), (2, 8, 2, 6, 30)])
def test_decode_step_rotates_writes_and_attends(B, H, KV, D, slot):
    """Equals: rotate-half RoPE on q and k, k and v written at ``slot``, SDPA over [0, slot]."""
    from layercake.models.layers import apply_rotary

    g = torch.Generator().manual_seed(slot)
    cap = slot + 5
    qkv = torch.randn(B, (H + 2 * KV) * D, generator=g)
    ang = torch.rand(B, D // 2, generator=g) * 6
    cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()
    ck, cv = torch.randn(B, KV, cap, D, generator=g), torch.randn(B, KV, cap, D, generator=g)
    mask = torch.rand(B, 1, 1, slot + 1, generator=g) > 0.3
    mask[..., slot] = True
    ref_k, ref_v = ck.clone(), cv.clone()
    q = apply_rotary(qkv[:, : H * D].view(B, H, D), cos[:, None], sin[:, None])
    k = apply_rotary(qkv[:, H * D : (H + KV) * D].view(B, KV, D), cos[:, None], sin[:, None])
    ref_k[:, :, slot], ref_v[:, :, slot] = k, qkv[:, (H + KV) * D :].view(B, KV, D)
    want = F.scaled_dot_product_attention(
        q[:, :, None], ref_k[:, :, : slot + 1], ref_v[:, :, : slot + 1], attn_mask=mask,
        scale=D**-0.5, enable_gqa=True,
    ).reshape(B, H * D)  # fmt: skip
    got = kernels.decode_step(qkv, cos, sin, ck, cv, slot, mask, D**-0.5, H)
    torch.testing.assert_close(ck, ref_k, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cv, ref_v)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_decode_step_rejects_bad_arguments():
    ck = torch.zeros(1, 2, 4, 8)
    qkv, cs, m = torch.zeros(1, 8 * 8), torch.zeros(1, 8), torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="outside the cache"):
        kernels.decode_step(qkv, cs, cs, ck, ck.clone(), 4, m, 1.0, 4)
    with pytest.raises(RuntimeError, match="qkv must be"):
        kernels.decode_step(qkv[:, :-1], cs, cs, ck, ck.clone(), 3, m, 1.0, 4)
    with pytest.raises(RuntimeError, match="multiple of KV"):
        kernels.decode_step(torch.zeros(1, 7 * 8), cs, cs, ck, ck.clone(), 3, m, 1.0, 3)


@pytest.mark.parametrize("shape", [(1, 3072), (5, 2, 38), (3, 2)])
def test_silu_mul_equals_pytorch(shape):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g) * 6
    x.view(-1)[:4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])[: x.numel()]
    gate, up = x.chunk(2, -1)
    torch.testing.assert_close(kernels.silu_mul(x), F.silu(gate) * up, rtol=2e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="silu_mul: float32"):
        kernels.silu_mul(torch.zeros(2, 3))


def test_bf16_widened_for_many_rows_equals_bf16_mm(monkeypatch):
    """A prompt's many rows multiply a bf16 weight widened to fp32 slab by slab (MKL); the result
    equals ``bf16_mm``'s, with a bias, over several slabs, and few rows still take ``bf16_mm``
    (where AMX is absent: with it, many rows take the tiles, ``tests/test_amx.py``)."""
    from layercake.ops import linear

    monkeypatch.setattr(kernels, "_AMX", [False])
    g = torch.Generator().manual_seed(3)
    w = torch.randn(100, 64, generator=g).to(BF)
    b = torch.randn(100, generator=g)
    monkeypatch.setattr(linear, "WIDEN_SLAB", 64 * 30)  # 30 rows a slab: 4 slabs
    monkeypatch.setattr(linear, "_slabs", linear.threading.local())
    calls = []
    widened = linear._widened
    monkeypatch.setattr(linear, "_widened", lambda *a: calls.append(a) or widened(*a))
    x = torch.randn(2, 150, 64, generator=g)  # 300 rows >= WIDEN_ROWS
    want = kernels.bf16_linear(x, w, b)
    got = linear.BF16(w, widen=True).linear(x, b)
    assert len(calls) == 1  # the widened path ran
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    linear.BF16(w, widen=True).linear(x[:, :10], b)  # 20 rows: bf16_mm
    linear.BF16(w).linear(x, b)  # not widened where the holder did not ask (offload)
    assert len(calls) == 1

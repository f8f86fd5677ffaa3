"""A prompt's attention on fused q/k/v: the norms and RoPE in place (``kernels.qk_norm_rope``)
give the bits of the separate ops they replace (``Attention.normed`` then ``Rope.apply``), for
q/k norms over the projection (OLMoE), per head (Qwen3) and none (Llama), GQA included; and
``moe.grouped`` writes bf16 experts' outputs over their rows (``MLP.forward_into``), same values."""

import pytest
import torch

from layercake.kv_cache import AttentionStep
from layercake.models import llama, moe
from layercake.models.layers import Rotary
from layercake.ops import kernels
from layercake.ops.linear import Linear, from_float

pytestmark = pytest.mark.skipif(
    not kernels.available(), reason=f"no CPU kernels here: {kernels.unavailable_reason()}"
)


def attention(qk_norm: str, H: int, KV: int, hd: int) -> llama.Attention:
    c = llama.Config(model_type="llama", hidden_size=H * hd, num_attention_heads=H,
                     num_key_value_heads=KV, head_dim=hd, intermediate_size=8, vocab_size=8,
                     num_hidden_layers=1, max_position_embeddings=256, rms_norm_eps=1e-5,
                     qk_norm=qk_norm)  # fmt: skip
    a = llama.Attention(c)
    g = torch.Generator().manual_seed(3)
    if qk_norm:
        a.q_norm.weight.data = torch.rand(a.q_norm.weight.shape, generator=g) + 0.5
        a.k_norm.weight.data = torch.rand(a.k_norm.weight.shape, generator=g) + 0.5
    return a


@pytest.mark.parametrize("qk_norm,H,KV,hd", [("proj", 4, 4, 16), ("head", 4, 2, 32),
                                             ("", 6, 2, 8), ("proj", 2, 1, 64)])  # fmt: skip
def test_in_place_norms_and_rope_equal_the_separate_ops(qk_norm, H, KV, hd):
    a = attention(qk_norm, H, KV, hd)
    B, T = 3, 5
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(B, T, (H + 2 * KV) * hd, generator=g) * 3
    positions = torch.arange(T).repeat(B, 1) + torch.tensor([[0], [7], [100]])
    rope = Rotary(hd, 10000.0, None).rope(positions, torch.float32)
    assert a.in_place(qkv, rope)
    want = a.normed(qkv) if qk_norm else qkv.clone()
    qk = rope.apply(want[..., : (H + KV) * hd].view(B, T, H + KV, hd))
    want[..., : (H + KV) * hd] = qk.reshape(B, T, -1)
    got = qkv.clone()
    qw, kw = (a.q_norm.weight, a.k_norm.weight) if qk_norm else (llama._NONE, llama._NONE)
    kernels.qk_norm_rope(got, qw, kw, 1e-5, rope.cos, rope.sin, H, KV)
    assert torch.equal(got, want)


def test_prompt_attention_takes_the_in_place_path_with_the_same_output(monkeypatch):
    H, KV, hd, B, T = 4, 2, 16, 2, 6
    a = attention("proj", H, KV, hd)
    fused = torch.nn.Linear(H * hd, (H + 2 * KV) * hd, bias=False)
    a.qkv_proj = fused
    x = torch.randn(B, T, H * hd)
    rope = Rotary(hd, 10000.0, None).rope(torch.arange(T).repeat(B, 1), torch.float32)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    step = AttentionStep(start=0, end=T, mask=causal.expand(B, 1, T, T))

    def run() -> torch.Tensor:
        ck, cv = torch.zeros(B, KV, T, hd), torch.zeros(B, KV, T, hd)
        return a.forward(x, rope, ck, cv, step)

    calls = []
    real = kernels.qk_norm_rope
    monkeypatch.setattr(kernels, "qk_norm_rope", lambda *args: calls.append(1) or real(*args))
    got = run()
    assert calls == [1]
    monkeypatch.setattr(llama.Attention, "in_place", lambda self, qkv, rope: False)
    assert torch.equal(got, run())


def test_qk_norm_rope_rejects_bad_arguments():
    qkv, cs = torch.zeros(2, 4 * 8), torch.zeros(2, 8)
    e = torch.empty(0)
    with pytest.raises(RuntimeError, match="qk_norm_rope: the last dim"):
        kernels.qk_norm_rope(torch.zeros(2, 30), e, e, 1e-5, cs, cs, 2, 1)
    with pytest.raises(RuntimeError, match="cos and sin need"):
        kernels.qk_norm_rope(qkv, e, e, 1e-5, cs[:1], cs, 2, 1)
    with pytest.raises(RuntimeError, match="norms' weights"):
        kernels.qk_norm_rope(qkv, torch.ones(5), e, 1e-5, cs, cs, 2, 1)
    with pytest.raises(RuntimeError, match="contiguous"):
        kernels.qk_norm_rope(torch.zeros(4 * 8, 2).t(), e, e, 1e-5, cs, cs, 2, 1)


def test_grouped_writes_each_experts_output_over_its_rows(monkeypatch):
    """bf16 experts with fused gate/up: ``grouped`` takes ``MLP.forward_into`` (no output
    copy), with the values of ``forward``."""
    c = llama.Config(model_type="llama", hidden_size=64, num_attention_heads=2,
                     num_key_value_heads=2, head_dim=32, intermediate_size=48, vocab_size=8,
                     num_hidden_layers=1, max_position_embeddings=16)  # fmt: skip
    g = torch.Generator().manual_seed(4)
    experts = torch.nn.ModuleList()
    for _ in range(4):
        m = llama.MLP(c)
        gu = (torch.randn(96, 64, generator=g) / 8).bfloat16()
        m.gate_up_proj = Linear(from_float("bf16", gu))
        m.down_proj = Linear(from_float("bf16", (torch.randn(64, 48, generator=g) / 7).bfloat16()))
        experts.append(m)
    x = torch.randn(40, 64, generator=g)
    ids = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(40)])
    w = torch.rand(40, 2, generator=g)
    calls = []
    real = llama.MLP.forward_into
    monkeypatch.setattr(llama.MLP, "forward_into", lambda *a: calls.append(1) or real(*a))
    got = moe.grouped(x, ids, w, experts)
    assert len(calls) == 4
    monkeypatch.setattr(llama.MLP, "forward_into", lambda *a: False)
    assert torch.equal(got, moe.grouped(x, ids, w, experts))

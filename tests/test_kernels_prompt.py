"""A prompt's attention on fused q/k/v: the norms and RoPE in place (``kernels.qk_norm_rope``)
give the bits of the separate ops they replace (``Attention.normed`` then ``Rope.apply``), for
q/k norms over the projection (OLMoE), per head (Qwen3) and none (Llama), GQA included, and a
prompt's pass allocates none of their temporaries."""

import pytest
import torch

from layercake.kv_cache import AttentionStep
from layercake.models import llama
from layercake.models.layers import Rotary
from layercake.ops import kernels

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

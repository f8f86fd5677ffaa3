"""``amx_bf16x3_mm``: fp32 activations times bf16 weights on AMX tiles, with the activations split
exactly into three bf16 parts, must be as exact as an fp32 GEMM (both against a float64
reference), for every shape (tails of M, N and K), into column ranges, over row blocks; and
without AMX everything still runs on ``bf16_mm``. Skipped where the CPU (or OS) has no AMX."""

import os
import subprocess
import sys

import pytest
import torch
from tests_helpers import bf16_llama

import layercake
from layercake.ops import kernels
from layercake.ops.linear import BF16, bf16_kernel

amx = pytest.mark.skipif(
    not kernels.available() or not kernels.amx(), reason="no AMX-BF16 (or no CPU kernels) here"
)


def _case(M: int, K: int, N: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * 3
    w = (torch.randn(N, K, generator=g) * 0.05).bfloat16()
    return x, w


def _errors(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> tuple[float, float]:
    """(max error of y, max error of PyTorch's fp32 GEMM), both against float64."""
    ref = x.double() @ w.double().T
    f32 = x @ w.float().T
    return (y.double() - ref).abs().max().item(), (f32.double() - ref).abs().max().item()


SHAPES = [(1, 64, 16), (3, 32, 32), (16, 2048, 512), (17, 100, 70), (32, 96, 33), (40, 2048, 300),
          (7, 31, 5), (33, 8192, 48), (300, 256, 96)]  # fmt: skip


@amx
@pytest.mark.parametrize("M,K,N", SHAPES)
def test_as_exact_as_an_fp32_gemm(M, K, N):
    x, w = _case(M, K, N)
    err, fp32 = _errors(kernels.bf16x3_mm(x, w), x, w)
    # the same products as an fp32 GEMM, summed in another order; dropping the third part
    # (lo) alone gives several times fp32's error at K >= 100
    assert err <= 2 * fp32 + 1e-7, (err, fp32)


@amx
def test_every_row_count_up_to_40():
    x, w = _case(40, 160, 48, seed=1)
    for M in range(1, 41):
        err, fp32 = _errors(kernels.bf16x3_mm(x[:M], w), x[:M], w)
        assert err <= 2 * fp32 + 1e-7, (M, err, fp32)


@amx
def test_into_columns_of_a_wider_output_and_over_row_blocks():
    x, w = _case(20, 128, 80, seed=2)
    wide = torch.full((20, 100), 7.0)
    kernels.bf16x3_mm(x, w, out=wide[:, 10:90])
    err, fp32 = _errors(wide[:, 10:90], x, w)
    assert err <= 2 * fp32 + 1e-7
    assert (wide[:, :10] == 7).all() and (wide[:, 90:] == 7).all()
    # a weight held as row blocks (rows in different tiers), with a bias, as the BF16 form
    bias = torch.randn(80)
    blocks = BF16([w[:16], w[16:50], w[50:]])
    y = blocks.linear(x.view(4, 5, 128), bias)
    ref = (x.double() @ w.double().T + bias.double()).view(4, 5, 80)
    f32 = (x @ w.float().T + bias).view(4, 5, 80)
    assert (y.double() - ref).abs().max() <= 2 * (f32.double() - ref).abs().max() + 1e-7


@amx
def test_non_finite_activations_as_fp32():
    x, w = _case(16, 64, 32, seed=3)
    x[0, 5], x[1, 7], x[2, 9] = float("inf"), float("-inf"), float("nan")
    y, f32 = kernels.bf16x3_mm(x, w), x @ w.float().T
    assert torch.equal(y.isnan(), f32.isnan()) and torch.equal(y.isinf(), f32.isinf())
    assert torch.equal(y[y.isinf()], f32[f32.isinf()])


@amx
def test_bf16_linear_takes_the_tiles_from_amx_rows(monkeypatch):
    calls = []
    real = kernels.bf16x3_mm
    monkeypatch.setattr(kernels, "bf16x3_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, w = _case(kernels.AMX_ROWS, 64, 32)
    kernels.bf16_linear(x[:1], w)
    assert not calls  # one row: bf16_mm
    kernels.bf16_linear(x, w)
    assert calls
    assert "AMX" in bf16_kernel()


@amx
def test_wrong_operands_say_so():
    x, w = _case(4, 64, 32)
    with pytest.raises(RuntimeError, match="amx_bf16x3_mm: w must be 2-D bf16"):
        kernels.bf16x3_mm(x, w.float())
    with pytest.raises(RuntimeError, match="amx_bf16x3_mm: shapes do not match"):
        kernels.bf16x3_mm(x[:, :32], w)


@pytest.mark.skipif(not kernels.available(), reason="no CPU kernels here")
def test_without_amx_bf16_mm_runs():
    """LAYERCAKE_NO_AMX (or a CPU without AMX): the BF16 form multiplies on ``bf16_mm`` and its
    widened-MKL path, with the same exactness."""
    code = (
        "import torch; from layercake.ops import kernels as k, linear as l\n"
        "x = torch.randn(300, 64); w = torch.randn(40, 64).bfloat16()\n"
        "ref = x.double() @ w.double().T\n"
        "for n in (1, 8, 300):\n"
        "    y = l.BF16(w, widen=True).linear(x[:n])\n"
        "    assert (y.double() - ref[:n]).abs().max() < 1e-4\n"
        "print(k.amx(), l.bf16_kernel())\n"
    )
    env = {**os.environ, "LAYERCAKE_NO_AMX": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("False bf16_mm"), out.stdout


@amx
def test_offloaded_bf16_weights_take_the_tiles_and_equal_memory(tmp_path, monkeypatch):
    """An offloaded bf16 model (each weight's rows in RAM and on disk: row blocks) multiplies a
    prompt on the tiles, with the logits of fp32 weights on MKL."""
    path = bf16_llama(tmp_path / "m", hidden=128, inter=256, vocab=512)
    prompts = [[(7 * i + 3 * j) % 500 + 3 for j in range(20)] for i in range(4)]
    monkeypatch.setattr(kernels, "_AMX", [False])
    want = layercake.load(path, exact=True).logits(prompts)  # fp32 weights, MKL
    monkeypatch.setattr(kernels, "_AMX", [True])
    blocks = []
    real = kernels.bf16x3_mm
    monkeypatch.setattr(kernels, "bf16x3_mm", lambda x, w, out=None: blocks.append(out is not None)
                        or real(x, w, out))  # fmt: skip
    llm = layercake.load(path, percent=(0, 40, 100, 0, 100, 0), offload_dir=tmp_path / "off",
                         batch_size=4, max_context=32)  # fmt: skip
    got = llm.logits(prompts)
    assert any(blocks) and llm.runner.bytes_read > 0  # row blocks, some read from disk
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

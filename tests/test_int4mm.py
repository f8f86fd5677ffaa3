"""The packed int4 CPU matmul: equal to the dequantized fp32 matmul within bf16 rounding."""

import pytest
import torch
import torch.nn.functional as F

from layercake.ops.int4pack import PackedInt4, kernel_ok, pack, sz_for_kernel
from layercake.ops.linear import Linear as Int4Linear
from layercake.quant import QuantSpec, dequantize, quantize

pytestmark = pytest.mark.skipif(not kernel_ok((64, 64), QuantSpec(4, 32), "cpu"),
                                reason="this PyTorch has no int4 CPU kernel")  # fmt: skip


@pytest.mark.parametrize("shape", [(64, 576), (192, 576), (1536, 256), (128, 2048)])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_packed_matmul_equals_dequantized(shape, group):
    if shape[1] % group:
        pytest.skip("group does not divide the width")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g) * 0.05 + 0.01
    q = quantize(w, 4, group)
    ref_w = dequantize(q)
    x = torch.randn(5, 3, shape[1], generator=g)
    bias = torch.randn(shape[0], generator=g)
    lin = Int4Linear(PackedInt4.from_parts(*pack(q), q.spec), bias)
    y = lin(x)
    assert y.shape == (5, 3, shape[0]) and y.dtype == torch.float32
    ref = F.linear(x, ref_w, bias)
    err = (y - ref).norm() / ref.norm()
    assert err < 1e-2  # bf16 activations, scales and results
    # the bf16 rounding of the activations accounts for most of it
    assert (y - F.linear(x.bfloat16().float(), ref_w, bias)).norm() / ref.norm() < err


def test_blocks_are_independent_byte_ranges():
    """Packing rows [64, 192) alone gives bytes [1, 3) blocks of the whole: ranges of whole
    blocks can be placed, read and multiplied on their own."""
    w = torch.randn(256, 128)
    q = quantize(w, 4, 32)
    data, sz = pack(q)
    part = quantize(w[64:192], 4, 32)
    pdata, psz = pack(part)
    assert torch.equal(pdata, data[1:3]) and torch.equal(psz, sz[64:192])
    x = torch.randn(4, 128)
    whole = PackedInt4.from_parts(data, sz, q.spec).linear(x)
    seg = PackedInt4.from_parts(pdata, psz, part.spec).linear(x)
    torch.testing.assert_close(seg, whole[:, 64:192])


def test_scales_transposed_into_a_buffer():
    sz = torch.randn(128, 8).bfloat16()
    out = torch.empty(128 * 8, dtype=torch.bfloat16)
    got = sz_for_kernel(sz, out)
    assert got.data_ptr() == out.data_ptr() and got.shape == (4, 128, 2)
    assert torch.equal(got, sz.view(128, 4, 2).transpose(0, 1))


def test_kernel_ok_only_where_the_kernel_runs():
    s4, s8 = QuantSpec(4, 32), QuantSpec(8, 32)
    assert kernel_ok((128, 64), s4, "cpu")
    assert not kernel_ok((100, 64), s4, "cpu")  # whole blocks of 64 output rows
    assert not kernel_ok((128, 64), s8, "cpu")
    assert not kernel_ok((128, 64), QuantSpec(4, 16), "cpu")
    assert not kernel_ok((128, 64), s4, "meta")


def test_int8_per_row_matmul_equals_dequantized():
    """int8, one group per row (an int4 model's head): the int8 kernel plus a per-row offset."""
    from layercake.ops.int4pack import PackedInt8, kernel8_ok, nbytes8
    from layercake.quant import QTensor, quantize_rows

    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 208, generator=g) * 0.05 + 0.02  # the offsets matter
    spec = QuantSpec(8, 208)
    assert kernel8_ok(w.shape, spec, "cpu") and not kernel8_ok(w.shape, QuantSpec(8, 52), "cpu")
    assert not kernel8_ok((96, 200), QuantSpec(8, 200), "cpu")  # the kernel needs 16 | width
    rows = quantize_rows(w, spec)
    ref_w = dequantize(QTensor.from_rows(rows, tuple(w.shape), spec))
    buf = torch.empty(nbytes8(96, 208) + 8, dtype=torch.uint8)
    p = PackedInt8.from_rows(rows, spec, buf)
    assert p.data.data_ptr() == buf.data_ptr()
    x = torch.randn(7, 208, generator=g)
    y = Int4Linear(p)(x)
    ref = F.linear(x, ref_w)
    assert (y - ref).norm() / ref.norm() < 1e-2
    assert (y - F.linear(x.bfloat16().float(), ref_w)).norm() / ref.norm() < 5e-3

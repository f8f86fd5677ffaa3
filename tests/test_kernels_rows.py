"""block_mm's many-row paths against its one-row path: each row of a many-row product is bit for
bit that row multiplied alone (panels of 16 weight rows on 512-bit vectors or 8 on AVX2, VNNI or
AVX2 integer dots, any row count, odd numbers of blocks, weights at odd addresses), and every
instruction-set path gives the same bits (``LAYERCAKE_NO_AVX512`` / ``LAYERCAKE_NO_VNNI`` in a
fresh process)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from layercake.ops import kernels
from layercake.ops.blocks import to_blocks
from layercake.quant import quantize

pytestmark = pytest.mark.skipif(
    not kernels.available(), reason=f"no CPU kernels here: {kernels.unavailable_reason()}"
)

CASES = [(bits, K) for bits in (4, 8) for K in (32, 96, 544, 576)]
ROWS = [*range(1, 10), 17]


def products() -> dict:
    """block_mm on fixed random operands: each (bits, K) at every row count of ``ROWS``, the
    weights at byte 1 of a buffer (their fp16 fields at odd addresses), on two threads."""
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(5)
    out = {}
    for bits, K in CASES:
        blocks = to_blocks(quantize(torch.randn(45, K, generator=g), bits, 32))
        odd = torch.empty(blocks.numel() + 1, dtype=torch.uint8)[1:].view(blocks.shape)
        odd.copy_(blocks)
        x = torch.randn(max(ROWS), K, generator=g) * torch.rand(max(ROWS), 1, generator=g) * 4
        for M in ROWS:
            out[bits, K, M] = (x[:M], kernels.block_mm(x[:M], odd, bits), blocks)
    return out


def test_each_row_is_the_row_alone():
    for (bits, K, M), (x, y, blocks) in products().items():
        for r in range(M):
            alone = kernels.block_mm(x[r : r + 1], blocks, bits)
            assert torch.equal(y[r : r + 1], alone), (bits, K, M, r)


@pytest.mark.parametrize("off", ["LAYERCAKE_NO_AVX512", "LAYERCAKE_NO_VNNI"])
def test_every_instruction_set_gives_the_same_bits(tmp_path: Path, off: str):
    here = {k: y for k, (_, y, _) in products().items()}
    code = (
        "import sys, torch; sys.path.insert(0, sys.argv[2]); import test_kernels_rows as t; "
        "torch.save({k: y for k, (_, y, _) in t.products().items()}, sys.argv[1])"
    )
    env = dict(os.environ, **{off: "1"})
    tests = str(Path(__file__).parent)
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "y.pt"), tests], env=env,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    there = torch.load(tmp_path / "y.pt")
    assert there.keys() == here.keys()
    for k in here:
        assert torch.equal(here[k], there[k]), (off, k)

"""Offloading with compute on CUDA: side streams for weight and KV copies, the KV cache in pinned
host RAM or on disk, attention on the GPU or (``cpu_cache_compute``) on the CPU. Each case equals
the CPU in-memory run. Skipped where no GPU exists."""

from __future__ import annotations

import pytest
import torch

import layercake
from layercake.errors import LayercakeError

PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15], [20, 21, 22]]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def reference(tiny_llama):
    llm = layercake.load(tiny_llama)
    out = llm.generate(PROMPTS, max_new_tokens=6)
    return [r.token_ids for r in out], llm.logits(PROMPTS)


@cuda
@pytest.mark.parametrize(
    "percent",
    [
        (0, 0, 100, 0, 100, 0),  # weights streamed from disk, cache on the GPU
        (20, 30, 100, 0, 100, 0),  # weights in all three tiers
        (100, 0, 0, 100, 100, 0),  # weights on the GPU, cache in pinned host RAM
        (30, 30, 40, 30, 100, 0),  # cache on the GPU, in host RAM and on disk
        (0, 50, 0, 0, 100, 0),  # cache on disk
    ],
)
@pytest.mark.parametrize("cpu_cache_compute", [False, True])
@pytest.mark.parametrize("batch_size,num_batches", [(4, 1), (2, 2)])
def test_cuda_offloaded_equals_cpu_in_memory(
    tiny_llama, tmp_path, reference, percent, cpu_cache_compute, batch_size, num_batches
):
    tokens, logits = reference
    llm = layercake.load(tiny_llama, device="cuda", dtype="float32", percent=percent,
                         offload_dir=tmp_path, batch_size=batch_size, num_batches=num_batches,
                         cpu_cache_compute=cpu_cache_compute)  # fmt: skip
    assert [r.token_ids for r in llm.generate(PROMPTS, max_new_tokens=6)] == tokens
    torch.testing.assert_close(llm.logits(PROMPTS).cpu(), logits, rtol=1e-3, atol=1e-3)
    cache = llm.runner.new_cache(4, 8)
    devices = {t.device.type for t in cache.keys.values()}
    assert ("cpu" in devices) == (percent[2] < 100)  # the cache really left the GPU
    if percent[2] + percent[3] < 100:
        assert llm.runner.kv_on_disk > 0


def test_cpu_cache_compute_needs_cuda(tiny_llama, tmp_path):
    with pytest.raises(LayercakeError, match="needs --device cuda"):
        layercake.load(tiny_llama, percent=(0, 0, 100, 0, 100, 0), offload_dir=tmp_path,
                       cpu_cache_compute=True)  # fmt: skip

"""The disk tier of the KV cache: slot-major files streamed by direct I/O (read ahead into a ring
of RAM buffers, written back behind), coherent with the engine's in-place edits of their maps."""

from __future__ import annotations

import torch

import layercake
from layercake.offload.kvdisk import RING, DiskKV, KVStream

PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15], [20, 21, 22]]


def test_disk_kv_stream_round_trip(tmp_path):
    """Reads see what the map wrote; the map sees what the stream wrote back (direct I/O where
    the ranges are aligned, buffered otherwise)."""
    shape = (4, 2, 8, 256)  # (B, n_kv, capacity, hd): 2 rows x one slot = 4096 bytes
    k = DiskKV.create(tmp_path / "k", shape, torch.float32)
    v = DiskKV.create(tmp_path / "v", shape, torch.float32)
    assert not (tmp_path / "k").exists()  # unlinked: the map and descriptors hold it
    assert k.tensor.shape == shape and k.rows_of(k.tensor[2:4]) == 2
    assert k.rows_of(k.tensor[:, :1]) is None and k.rows_of(torch.zeros(shape)) is None
    ref_k, ref_v = torch.randn(shape), torch.randn(shape)
    k.tensor.copy_(ref_k)  # the engine's in-place edits go through the map
    v.tensor.copy_(ref_v)
    stream = KVStream()
    for row0, rows in ((2, 2), (1, 1), (0, 4)):  # aligned (direct), unaligned, whole
        stream.fetch("a", k, v, row0, rows, upto=5)
        kb, vb = stream.get("a")
        assert kb.shape == (rows, 2, 8, 256)
        torch.testing.assert_close(kb[:, :, :5], ref_k[row0 : row0 + rows, :, :5], rtol=0, atol=0)
        torch.testing.assert_close(vb[:, :, :5], ref_v[row0 : row0 + rows, :, :5], rtol=0, atol=0)
        new = torch.randn(rows, 2, 2, 256)
        kb[:, :, 5:7] = new
        vb[:, :, 5:7] = -new
        stream.store("a", 5, 7)
        stream.drain()
        ref_k[row0 : row0 + rows, :, 5:7] = new
        ref_v[row0 : row0 + rows, :, 5:7] = -new
        assert torch.equal(k.tensor, ref_k) and torch.equal(v.tensor, ref_v)
    assert stream.bytes_written > 0 and stream.bytes_read > 0
    stream.fetch("b", k, v, 0, 4, upto=3)  # a pass that fails gives its buffers back
    stream.abandon()
    assert stream.free.qsize() == RING


def test_kv_cache_on_disk_streamed_equals_in_memory(tmp_path):
    """KV cache of every layer on disk, shapes aligned for O_DIRECT, two micro-batches: the
    in-memory tokens, with the cache really streamed (read and written back)."""
    from tests_helpers import bf16_llama

    path = bf16_llama(tmp_path / "m", hidden=1024, layers=3, inter=256, vocab=512)
    want = [r.token_ids for r in layercake.load(path).generate(PROMPTS, max_new_tokens=5)]
    for percent in ((0, 50, 0, 0, 100, 0), (0, 50, 40, 0, 100, 0)):
        llm = layercake.load(path, percent=percent, offload_dir=tmp_path / "off", batch_size=2,
                             num_batches=2)  # fmt: skip
        assert [r.token_ids for r in llm.generate(PROMPTS, max_new_tokens=5)] == want
        r = llm.runner
        assert r.kv_on_disk >= 2 and r.kv_stream.bytes_written > 0 and r.kv_stream.bytes_read > 0
        files = [f for fs in r.kv_files for pair in fs.values() for f in pair]
        assert files and all(f.direct >= 0 for f in files)  # ext4 here: direct I/O
    assert not list((tmp_path / "off" / "kv").iterdir())  # nothing left behind

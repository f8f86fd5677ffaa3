"""Offloading: offloaded output == in-memory output, over placements, budgets and forms.

The schedule's own tests are in ``test_schedule.py``, the placement policy's in
``test_policy.py``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import layercake
from layercake.errors import LayercakeError
from layercake.offload.policy import STAGING_SLOTS
from layercake.ops import kernels
from layercake.ops.linear import BF16, Linear

PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15], [20, 21, 22]]


# ---- offloaded == in memory ----------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tiny_llama):
    llm = layercake.load(tiny_llama)
    out = llm.generate(PROMPTS, max_new_tokens=6)
    return [r.token_ids for r in out], llm.logits(PROMPTS)


@pytest.mark.parametrize(
    "percent",
    [
        (0, 0, 100, 0, 100, 0),  # all weights on disk
        (20, 30, 100, 0, 100, 0),  # mixed: some rows of every layer in each tier
        (100, 0, 100, 0, 100, 0),  # all resident
        (0, 100, 0, 100, 100, 0),  # weights in host RAM, KV cache in host RAM
        (0, 40, 30, 0, 50, 0),  # KV cache and activations partly on disk
        (10, 0, 0, 0, 0, 0),  # everything on disk but a tenth of the weights
    ],
)
@pytest.mark.parametrize("batch_size,num_batches", [(4, 1), (2, 2), (1, 3)])
def test_offloaded_equals_in_memory(tiny_llama, tmp_path, reference, percent, batch_size,
                                    num_batches):  # fmt: skip
    tokens, logits = reference
    llm = layercake.load(tiny_llama, percent=percent, offload_dir=tmp_path,
                         batch_size=batch_size, num_batches=num_batches)  # fmt: skip
    out = llm.generate(PROMPTS, max_new_tokens=6)
    assert [r.token_ids for r in out] == tokens
    torch.testing.assert_close(llm.logits(PROMPTS), logits, rtol=1e-4, atol=1e-4)
    if percent[0] + percent[1] < 100:
        assert llm.runner.bytes_read > 0  # it really streamed from disk


def test_offload_bf16_checkpoint_and_budget(tmp_path, monkeypatch):
    """A bf16 checkpoint under a byte budget: host-RAM rows stay views of the file, the rest is
    read from disk; equal to the in-memory run of the same weights."""
    from tests_helpers import bf16_llama

    import layercake.offload.footprint as off
    from layercake.checkpoint import open_checkpoint
    from layercake.config import load_config
    from layercake.models.parts import Parts

    path = bf16_llama(tmp_path / "m", hidden=128, inter=256, vocab=512)
    ref = layercake.load(path)
    want = [r.token_ids for r in ref.generate(PROMPTS, max_new_tokens=5)]
    ckpt = open_checkpoint(path)
    config = load_config(ckpt.config_dict())
    fp = off.footprint(ckpt, config, Parts.full(3), torch.float32, 4, 1, context=16)
    monkeypatch.setattr(off, "process_rss", lambda: 0)
    monkeypatch.setattr(off, "SAFETY", 0)
    budget = fp.activations + fp.work + fp.kv + STAGING_SLOTS * (fp.max_unit + fp.align)
    budget += fp.weights // 20
    llm = layercake.load(path, cpu_memory=budget, offload_dir=tmp_path / "off", batch_size=4,
                         max_context=16)  # fmt: skip
    pol = llm.runner.policy
    assert 0 < pol.w_cpu < 100 and pol.w_device == 0
    assert [r.token_ids for r in llm.generate(PROMPTS, max_new_tokens=5)] == want
    # host-RAM rows of bf16 tensors are views of the checkpoint's map, not copies (but those
    # of fused weights: the members' rows side by side)
    placed = [p for ps in llm.runner.placed for p in ps if p.cpu is not None]
    assert placed and all(p.cpu.dtype == torch.bfloat16 for p in placed)
    if kernels.available():  # the linears multiply those rows as they lie, in bf16
        assert llm.runner.as_stored and all(p.form == "bf16" for p in placed if p.cpu.dim() == 2)
        lins = [m for m in llm.runner.model.modules() if isinstance(m, Linear)]
        assert lins and all(isinstance(m.weight, BF16) for m in lins)
        assert llm.runner.scratch.numel() < 4096  # only the norms convert
    # the prepared layout is reused: a second load writes nothing
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "off").rglob("*.bin")}
    layercake.load(path, percent=(0, 0, 100, 0, 100, 0), offload_dir=tmp_path / "off")
    assert files and files == {p: p.stat().st_mtime_ns for p in (tmp_path / "off").rglob("*.bin")}


# ---- errors --------------------------------------------------------------------------------
def test_errors(tiny_llama, tmp_path):
    with pytest.raises(LayercakeError, match="offload dir"):
        layercake.load(tiny_llama, percent=(0, 0, 100, 0, 100, 0))
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(LayercakeError, match="not writable"):
        layercake.load(tiny_llama, percent=(0, 0, 100, 0, 100, 0), offload_dir=a_file / "sub")
    with pytest.raises(LayercakeError, match="too small"):
        layercake.load(tiny_llama, cpu_memory="1MB", offload_dir=tmp_path)
    with pytest.raises(LayercakeError, match="0-100"):
        layercake.load(tiny_llama, percent=(50, 60, 0, 0, 0, 0), offload_dir=tmp_path)


def test_disk_full_is_a_clear_error(tiny_llama, tmp_path, monkeypatch):
    import layercake.offload.tiers as tiers

    monkeypatch.setattr(tiers, "os_free_bytes", lambda d: 1000)
    with pytest.raises(LayercakeError, match="GB free"):
        layercake.load(tiny_llama, percent=(0, 0, 100, 0, 100, 0), offload_dir=tmp_path)


@pytest.mark.parametrize("streams", [1, 3, 4])
def test_direct_reads_in_concurrent_chunks(tmp_path, monkeypatch, streams):
    import layercake.offload.tiers as tiers

    monkeypatch.setattr(tiers, "_MIN_CHUNK", 4096)
    data = torch.randint(0, 256, (10 * 4096 + 512,), dtype=torch.uint8)
    path = tmp_path / "unit.bin"
    path.write_bytes(data.numpy().tobytes())
    buf = tiers.host_buffer(len(data))
    reader = tiers.DirectReader(path)
    assert reader.read_into(buf, 4096, 8 * 4096, streams=streams) == 8 * 4096
    assert torch.equal(buf[: 8 * 4096], data[4096 : 9 * 4096])
    with pytest.raises(LayercakeError, match="truncated"):  # raised in a worker, seen here
        reader.read_into(buf, 4096, 12 * 4096, streams=streams)
    reader.close()


def test_keep_in_ram_locks_a_mapped_view_or_copies(tmp_path, monkeypatch):
    import layercake.offload.tiers as tiers

    t = tiers.file_tensor(tmp_path / "w", (64, 1024), torch.bfloat16)
    t.normal_()
    kept = tiers.keep_in_ram(t[8:40])
    assert torch.equal(kept, t[8:40])
    locked = os.geteuid() == 0  # root may lock any amount; others up to RLIMIT_MEMLOCK
    assert (kept.data_ptr() == t[8:40].data_ptr()) or not locked
    monkeypatch.setattr(tiers, "_libc", None)  # no mlock: a private copy
    copy = tiers.keep_in_ram(t[8:40])
    assert copy.data_ptr() != t[8:40].data_ptr() and torch.equal(copy, t[8:40])


def _anonymous_kib(t: torch.Tensor) -> int:
    """Anonymous KiB of the mapping (``/proc/self/smaps``) that holds ``t``'s memory."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and not head[0].endswith(":"):
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            inside = lo <= t.data_ptr() < hi
        elif inside and head[0] == "Anonymous:":
            return int(head[1])
    return 0


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/proc/self/smaps").exists(),
                    reason="locks a view of 8 MiB (root) and reads smaps")  # fmt: skip
def test_let_go_drops_the_private_copies_a_lock_made(tmp_path):
    """A checkpoint's map is private and writable: locking a view of it copies its pages
    (copy-on-write), and an expert moved to disk must give those copies back, not only unlock
    them (they stayed resident: 0.28 GB at B=64 after the hot experts' moves)."""
    import mmap

    import layercake.offload.tiers as tiers

    path = tmp_path / "ckpt"
    path.write_bytes(torch.randn(6 * 2**20).to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    t = torch.frombuffer(m, dtype=torch.bfloat16)
    view = t[1000 : 1000 + 2**22]  # 8 MiB, not page-aligned
    want = view.clone()
    kept = tiers.keep_in_ram(view)
    assert kept.data_ptr() == view.data_ptr()
    assert _anonymous_kib(t) >= 8 * 1024  # the lock's private copies
    tiers.let_go(kept)
    assert _anonymous_kib(t) <= 8  # the two pages shared with neighbours, at most
    assert torch.equal(view, want)  # read from the file again if touched
    other = t[:100].clone()  # owned memory: let_go leaves it alone
    tiers.let_go(other)
    assert torch.equal(other, t[:100])


def test_truncated_offload_file_is_rewritten(tiny_llama, tmp_path, reference):
    layercake.load(tiny_llama, percent=(0, 0, 100, 0, 100, 0), offload_dir=tmp_path)
    victim = next(tmp_path.rglob("layer.1.bin"))
    with open(victim, "r+b") as f:
        f.truncate(100)
    llm = layercake.load(tiny_llama, percent=(0, 0, 100, 0, 100, 0), offload_dir=tmp_path)
    assert [r.token_ids for r in llm.generate(PROMPTS, max_new_tokens=6)] == reference[0]


def test_cli_generate_offloaded(tiny_chat_llama, tmp_path):
    from layercake.cli import main

    args = ["generate", "--model", str(tiny_chat_llama), "--prompt", "w1 w2 w3",
            "--max-new-tokens", "4", "--ignore-eos"]  # fmt: skip
    r1 = subprocess.run([sys.executable, "-m", "layercake.cli", *args], capture_output=True,
                        text=True)  # fmt: skip
    r2 = subprocess.run(
        [sys.executable, "-m", "layercake.cli", *args, "--percent", "0", "30", "100", "0", "100",
         "0", "--offload-dir", str(tmp_path)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r1.returncode == 0 and r2.returncode == 0, r2.stderr
    assert r1.stdout == r2.stdout
    assert main(["generate", "--model", str(tiny_chat_llama), "--prompt", "w1",
                 "--percent", "0", "0", "100", "0", "100", "0"]) == 2  # fmt: skip


# ---- memory-capped end to end -----------------------------------------------------------------
MEMLIMIT = Path(__file__).resolve().parents[2] / "shared/tools/memlimit"


def _memlimit_works() -> bool:
    if not MEMLIMIT.exists() or os.geteuid() != 0:
        return False
    r = subprocess.run([str(MEMLIMIT), "100M", "true"], capture_output=True)
    return r.returncode == 0


@pytest.mark.skipif(not _memlimit_works(), reason="needs root and shared/tools/memlimit")
def test_model_larger_than_the_memory_cap(tmp_path):
    """A bf16 checkpoint bigger than what the cap leaves after the runtime runs under a hard cap
    (page cache counted), streaming from disk, with the in-memory run's greedy tokens."""
    from tests_helpers import bf16_llama

    path = bf16_llama(tmp_path / "big", hidden=1024, layers=8, inter=4096, vocab=16384)
    size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    script = (
        "import json, sys, torch, layercake; torch.set_num_threads(2); "
        "kw = json.loads(sys.argv[2]); llm = layercake.load(sys.argv[1], **kw); "
        f"out = llm.generate({PROMPTS}, max_new_tokens=4, ignore_eos=True); "
        "print(json.dumps([r.token_ids for r in out]))"
    )
    ref = subprocess.run([sys.executable, "-c", script, str(path), "{}"], capture_output=True,
                         text=True, check=True)  # fmt: skip
    cap = "600M"
    kw = dict(cpu_memory=cap, offload_dir=str(tmp_path / "off"), batch_size=4, max_context=16)
    r = subprocess.run([str(MEMLIMIT), "--drop-caches", cap, sys.executable, "-c", script,
                        str(path), json.dumps(kw)], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.splitlines()[-1]) == json.loads(ref.stdout.splitlines()[-1])
    assert size > 200 * 2**20  # the weights alone are most of the cap
    # the same model in memory in fp32 does not survive the cap: the test really streams (its
    # bf16 weights multiplied as stored, the default, would just fit)
    r = subprocess.run([str(MEMLIMIT), cap, sys.executable, "-c", script, str(path),
                        '{"exact": true}'], capture_output=True, text=True)  # fmt: skip
    assert r.returncode != 0
    shutil.rmtree(tmp_path / "off")


# ---- compression ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "percent", [(0, 0, 0, 0, 100, 0), (20, 30, 50, 20, 100, 0), (100, 0, 100, 0, 100, 0)]
)
def test_compressed_offload_equals_compressed_in_memory(tiny_llama, tmp_path, percent):
    """Weights and cache compressed in every tier: the same values as compressed in memory."""
    kw = dict(compress_weight=True, compress_cache=True, group_size=16)
    ref = layercake.load(tiny_llama, **kw)
    want = [r.token_ids for r in ref.generate(PROMPTS, max_new_tokens=5)]
    llm = layercake.load(tiny_llama, percent=percent, offload_dir=tmp_path, batch_size=2, **kw)
    assert [r.token_ids for r in llm.generate(PROMPTS, max_new_tokens=5)] == want
    torch.testing.assert_close(llm.logits(PROMPTS), ref.logits(PROMPTS), rtol=1e-4, atol=1e-4)
    assert llm.runner.dequant_units > 0 and llm.runner.dequant_s > 0
    if percent[0] < 100:
        assert llm.runner.bytes_read > 0


@pytest.mark.parametrize(
    "percent", [(0, 0, 100, 0, 100, 0), (20, 30, 100, 0, 100, 0), (0, 65, 100, 0, 100, 0)]
)
def test_int4pack_offload_equals_int4pack_in_memory(tmp_path, percent):
    """int4 weights the CPU kernel takes stay in its form (int4pack) in every tier (values and
    scales placed apart, split between tiers at any row): the in-memory int4pack model's output."""
    from tests_helpers import bf16_llama

    from layercake.ops.linear import forms as forms_of

    path = bf16_llama(tmp_path / "m", hidden=128, inter=256, vocab=320)
    kw = dict(compress_weight=True, group_size=32)
    ref = layercake.load(path, exact=True, **kw)  # in memory on PyTorch's int4 kernel too
    assert forms_of(ref.runner.slices[0])["int4pack"] > 0
    want = [r.token_ids for r in ref.generate(PROMPTS, max_new_tokens=5)]
    llm = layercake.load(path, percent=percent, offload_dir=tmp_path / "off", batch_size=2, **kw)
    pieces = {e.piece for u in llm.runner.units for e in u.entries}
    assert pieces == {"", "data", "sz"}  # norms plain, every matrix int4pack (the head's too)
    assert [r.token_ids for r in llm.generate(PROMPTS, max_new_tokens=5)] == want
    torch.testing.assert_close(llm.logits(PROMPTS), ref.logits(PROMPTS), rtol=1e-5, atol=1e-5)
    if percent[1] < 100:
        assert llm.runner.bytes_read > 0


def test_compressed_weights_are_smaller_on_disk_and_in_reads(tmp_path):
    """int4 g32 files hold 4-bit values + scales and zeros (0.31x the bf16 bytes), the head
    int8 (0.51x): ~0.33x in all, and a step reads that many fewer bytes; both layouts coexist
    in one offload dir."""
    from tests_helpers import bf16_llama

    path = bf16_llama(tmp_path / "m", hidden=256, inter=512, vocab=512)
    off = tmp_path / "off"
    runs = {}
    for name, kw in (("bf16", {}), ("int4", dict(compress_weight=True))):
        llm = layercake.load(path, percent=(0, 0, 100, 0, 100, 0), offload_dir=off, **kw)
        before = llm.runner.bytes_read
        llm.generate(PROMPTS[:1], max_new_tokens=3)
        runs[name] = (llm.runner.bytes_read - before, llm.runner.disk_bytes)
    dirs = sorted(p for p in off.iterdir() if p.is_dir())
    assert len(dirs) == 2  # the compression mode is part of the layout's hash
    sizes = sorted(sum(f.stat().st_size for f in d.glob("*.bin")) for d in dirs)
    assert 0.31 < sizes[0] / sizes[1] < 0.35, sizes
    (read16, step16), (read4, step4) = runs["bf16"], runs["int4"]
    assert 0.31 < step4 / step16 < 0.35
    # three steps read (the next step's first units may already be prefetched)
    assert 3 * step4 <= read4 < 4 * step4 and 3 * step16 <= read16 < 4 * step16

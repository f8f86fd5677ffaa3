"""The benchmarks' own guarantees: a random checkpoint whose layers decide the tokens (an engine
that skips them fails the equality checks), ``layercake bench`` end to end, the roofline's
arithmetic, and benchmark parents that never import torch (a capped child is charged for
everything)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import layercake
from benchmarks.agreement import logits_agreement, tokens_agreement
from benchmarks.checkpoints import LLAMA_1B, write_random_llama

ROOT = Path(__file__).resolve().parents[1]

TINY = dict(LLAMA_1B, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256,
            bos_token_id=1, eos_token_id=2)  # fmt: skip


def test_an_engine_skipping_the_layers_fails_the_equality_checks(tmp_path: Path) -> None:
    # the same checkpoint with its layers skipped: the embeddings and the head only
    real = write_random_llama(tmp_path / "real", TINY)
    ids = torch.randint(3, 256, (3, 10), generator=torch.Generator().manual_seed(1)).tolist()
    ref = layercake.load(real)
    offloaded = layercake.load(real, percent=[0, 0, 100, 0, 100, 0], offload_dir=tmp_path / "o")
    skipping = layercake.load(real, parts="b e")
    want = ref.logits(ids).numpy()
    assert logits_agreement(want, offloaded.logits(ids).numpy())["logits_agree"]
    bad = logits_agreement(want, skipping.logits(ids).numpy())
    assert not bad["logits_agree"] and bad["same_argmax"] < 0.5, bad
    toks = lambda llm: [o.token_ids for o in llm.generate(ids, max_new_tokens=6, ignore_eos=True)]  # noqa: E731
    assert tokens_agreement(toks(ref), toks(offloaded))["tokens_agree"]
    assert not tokens_agreement(toks(ref), toks(skipping))["tokens_agree"]


def seed_limits(cache: Path, threads: int) -> None:
    """Limits already measured (the cache the CLI reads), so the test measures nothing."""
    from layercake.offload import measure

    key = measure.machine_key("cpu", threads, None)
    data = {"format": measure.FORMAT,
            "machines": {key: dict(key=key, disk_gbps=0.0, matmul_gflops=100.0)},
            "bench": {"bench|" + key: dict(ram_gbps=10.0, measured_at="test",
                                           matmul_gflops={"1": 5.0, "16": 50.0})}}  # fmt: skip
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "machine.json").write_text(json.dumps(data))


def test_layercake_bench_json_one_case(tmp_path: Path) -> None:
    model = write_random_llama(tmp_path / "m", TINY)
    env = dict(os.environ, LAYERCAKE_CACHE=str(tmp_path / "cache"))
    seed_limits(tmp_path / "cache", 1)
    cmd = [sys.executable, "-m", "layercake.cli", "bench", "--model", str(model), "--json",
           "-b", "2", "-p", "5", "-n", "4", "-r", "2", "--threads", "1", "-v"]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "[path: in memory, cpu" in p.stderr and "roofline: decode RAM" in p.stderr, p.stderr
    lines = [json.loads(ln) for ln in p.stdout.splitlines()]
    assert len(lines) == 1
    r = lines[0]
    assert (r["batch"], r["prompt_len"], r["gen_len"]) == (2, 5, 4)
    for k in ("prefill_tok_s", "decode_tok_s", "e2e_tok_s", "ttft_s", "peak_rss_mb"):
        assert r[k] > 0, k
    assert len(r["e2e_tok_s_runs"]) == 2
    # FlexGen's end-to-end rate: all generated tokens over prefill + decode
    total = 2 * 5 / r["prefill_tok_s"] + 2 * 3 / r["decode_tok_s"]
    assert r["e2e_tok_s"] == pytest.approx(2 * 4 / total, rel=0.02)
    assert r["limits"]["ram_gbps"] == 10.0 and r["disk_bytes_per_token"] == 0
    # bf16 in memory, multiplied as stored (the default): every linear weight (3 layers + the
    # tied head) read once a step, 2 bytes a value
    params = 3 * (64 * (64 + 2 * 32) + 64 * 64 + 3 * 64 * 128) + 256 * 64
    assert r["ram_bytes_per_token"] == pytest.approx(2 * params / 2, rel=0.05)
    assert 0 < r["ram_fraction"] and 0 < r["decode_matmul_fraction"]


def test_roofline_arithmetic() -> None:
    from layercake.bench.limits import Limits
    from layercake.bench.roofline import format_roofline, roofline

    lim = Limits(key="k", ram_gbps=10.0, disk_gbps=2.0, matmul_gflops={1: 5.0, 16: 50.0, 4: 1.0})
    assert lim.matmul_peak(8) == 5.0 and lim.matmul_peak(16) == 50.0  # never judged vs faster
    run = dict(batch=1, prompt_len=16, prefill_s=1.0, decode_s=2.0, decode_steps=10,
               params=10**9, ram_bytes_per_step=10**9, disk_bytes_per_step=2 * 10**8)  # fmt: skip
    r = roofline(run, lim)
    # a 0.2 s step: RAM 5 GB/s of 10, disk 1 of 2, 10 GFLOP/s of 5 at one row: above 1
    assert r["ram_fraction"] == 0.5 and r["disk_fraction"] == 0.5
    assert r["decode_matmul_fraction"] == 2.0 and "limit_problem" in r
    assert r["prefill_matmul_fraction"] == pytest.approx(32 / 50)
    assert "RAM 5.0/10.0 GB/s (0.50)" in format_roofline(r, lim, 1)


def test_benchmark_parents_do_not_import_torch() -> None:
    code = ("import sys, benchmarks.offload, benchmarks.compression, benchmarks.generation, "
            "benchmarks.decode; assert 'torch' not in sys.modules, 'torch imported'")  # fmt: skip
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_the_roofline_line_of_a_generation(tmp_path: Path, monkeypatch) -> None:
    """What ``generate -v`` prints after its speed figures."""
    model = write_random_llama(tmp_path / "m", TINY)
    monkeypatch.setenv("LAYERCAKE_CACHE", str(tmp_path / "cache"))
    seed_limits(tmp_path / "cache", torch.get_num_threads())
    llm = layercake.load(model)
    llm.generate([[5, 6, 7]], max_new_tokens=4, ignore_eos=True)
    from layercake.bench.roofline import roofline_line

    line = roofline_line(llm, llm.last_stats)
    assert line.startswith("roofline: decode RAM") and "/10.0 GB/s" in line, line
    assert "at 1 row (" in line and "prefill matmul" in line

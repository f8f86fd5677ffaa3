"""The planner: cost model monotonic in bandwidth and budget, plans within the memory limits and
never more than the runner really holds, measurement cached, clear errors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import layercake
import layercake.offload.footprint as off
from layercake.checkpoint import open_checkpoint
from layercake.config import load_config
from layercake.errors import LayercakeError
from layercake.models.parts import Parts
from layercake.offload import calibrate, measure
from layercake.offload.calibrate import UnitTimes
from layercake.offload.footprint import memory_bytes
from layercake.offload.measure import Machine
from layercake.offload.planner import Model, Workload, search
from layercake.offload.policy import STAGING_SLOTS, plan_policy
from layercake.offload.store import plan_units

PROMPTS = [[1, 5, 9, 2], [3, 3, 7], [8, 1, 4, 4, 6]]
SIZES = [1, 2, 4, 8]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Measurements go to a fresh cache; the disk probe is small; the process holds nothing."""
    monkeypatch.setenv("LAYERCAKE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(measure, "PROBE_BYTES", 8 * 2**20)
    monkeypatch.setattr(measure, "CHUNK_BYTES", 4 * 2**20)
    monkeypatch.setattr(measure, "matmul_gflops", lambda device="cpu": 100.0)  # seconds saved
    monkeypatch.setattr(off, "process_rss", lambda: 0)
    monkeypatch.setattr(off, "SAFETY", 0)


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory) -> Path:
    from tests_helpers import bf16_llama

    return bf16_llama(tmp_path_factory.mktemp("m") / "m", hidden=128, inter=256, vocab=512)


def synthetic(path: Path, load_s: float = 1e-3, per_seq: float = 1e-4) -> Model:
    """A ``Model`` of the checkpoint with made-up unit times: no measuring, deterministic."""
    from layercake.models import family

    ckpt = open_checkpoint(path)
    config = load_config(ckpt.config_dict())
    parts = Parts.full(config.num_hidden_layers)
    fam = family(config.model_type)
    with torch.device("meta"):
        meta = fam.Model(config, parts)
    units = plan_units(ckpt, meta, parts.layers, True, torch.float32)
    times = UnitTimes(
        layer_load_s=load_s,
        head_load_s_per_row=load_s / 1000,
        decode_layer_s={b: 2e-4 + per_seq * b for b in SIZES},
        prefill_layer_s={b: 2e-4 + 8 * per_seq * b for b in SIZES},
        head_s_per_row={b: per_seq * b / 1000 for b in SIZES},
    )

    def fp(bs: int, nb: int, context: int):
        return off.footprint(ckpt, config, parts, torch.float32, bs, nb, context)

    return Model(units, config, 0, times, None, 4.0, fp)


def machine(disk: float) -> Machine:
    return Machine("test", disk, 100.0)


W = Workload(8, 8, 8)


def _budgets(m: Model) -> list[int]:
    fp = m.footprint(1, 1, W.context)
    floor = fp.activations + STAGING_SLOTS * fp.max_unit + fp.work + fp.kv
    return [floor + k * fp.weights // 4 for k in (1, 2, 3, 4, 8, 12)]


def test_cost_model_monotonic_in_bandwidth(bf16_model, tmp_path):
    m = synthetic(bf16_model)
    budget = _budgets(m)[1]
    last = 0.0
    for disk in (0.01, 0.1, 0.5, 2.0, 10.0):
        p = search([m], machine(disk), W, budget, None, False, 0, tmp_path)
        assert p.throughput >= last - 1e-9
        last = p.throughput
    assert last > 0


def test_cost_model_monotonic_in_budget_and_within_it(bf16_model, tmp_path):
    m = synthetic(bf16_model)
    last, held = 0.0, -1.0
    for budget in _budgets(m):
        p = search([m], machine(0.05), W, budget, None, False, 0, tmp_path)
        assert p.total_memory <= budget
        assert p.throughput >= last - 1e-9
        last = p.throughput
        for alt in p.alternatives:
            assert alt["predicted_memory_bytes"] <= budget
        if p.policy.batch_size == 8 and p.policy.num_batches == 1:
            assert p.policy.w_cpu + p.policy.w_device >= held
            held = p.policy.w_cpu + p.policy.w_device
    assert p.resident  # the biggest budget holds everything


def test_batch_constraints_are_kept(bf16_model, tmp_path):
    m = synthetic(bf16_model)
    p = search([m], machine(0.05), W, _budgets(m)[2], None, False, 0, tmp_path, 2, 2)
    assert (p.policy.batch_size, p.policy.num_batches) == (2, 2)


def test_memory_model_matches_budget_placement(bf16_model):
    """``memory_bytes`` (what a policy holds) and ``plan_policy`` (a policy from a budget) agree:
    the placement planned for a budget never holds more than it."""
    m = synthetic(bf16_model)
    fp = m.footprint(4, 1, 16)
    for budget in _budgets(m)[:4]:
        pol = plan_policy(fp, budget, None, False, 4, 1)
        held = sum(memory_bytes(fp, pol, False, 0, 0).values())
        assert held <= budget + STAGING_SLOTS * 18 * 4096 + 4096


def test_budget_too_small_says_the_minimum(bf16_model, tmp_path):
    m = synthetic(bf16_model)
    with pytest.raises(LayercakeError, match=r"too small.*at least"):
        search([m], machine(1.0), W, 10_000, None, False, 0, tmp_path)


def test_weights_that_need_disk_without_offload_dir(bf16_model):
    m = synthetic(bf16_model)
    with pytest.raises(LayercakeError, match="offload-dir"):
        search([m], machine(1.0), W, _budgets(m)[0], None, False, 0, None)


def test_auto_runs_within_its_plan(bf16_model, tmp_path):
    """``policy="auto"`` end to end (real measurements, tiny): the runner holds no more than
    the plan counts for each part, and its tokens equal the in-memory run's."""
    want = [r.token_ids for r in layercake.load(bf16_model).generate(PROMPTS, max_new_tokens=4)]
    m = synthetic(bf16_model)
    budget = _budgets(m)[1]
    llm = layercake.load(bf16_model, cpu_memory=budget, offload_dir=tmp_path / "off",
                         policy="auto", max_context=16, max_sequences=4)  # fmt: skip
    r, plan = llm.runner, llm.runner.plan
    assert not plan.resident and plan.total_memory <= budget
    assert r.policy == plan.policy and plan.policy.block_size <= 4
    held = sum(t.numel() * t.element_size() for ps in r.placed for p in ps
               for t in (p.cpu, p.dev) if t is not None)  # fmt: skip
    assert held <= plan.memory["weights"]
    assert r.scratch.numel() * r.scratch.element_size() <= plan.memory["scratch"]
    if r.loader is not None:
        assert sum(s.numel() for s in r.loader.slots) <= plan.memory["staging"]
    cache = r.new_cache(plan.policy.block_size, 16)
    in_ram = [t for t in cache.tensors() if t.untyped_storage().filename is None]
    kv = sum(t.numel() * t.element_size() for t in in_ram)
    assert kv <= plan.memory["kv_cache"]
    assert [x.token_ids for x in llm.generate(PROMPTS, max_new_tokens=4)] == want


def test_measurements_are_cached(bf16_model, tmp_path, monkeypatch):
    cfg = json.loads((bf16_model / "config.json").read_text())
    args = (cfg, torch.bfloat16, torch.device("cpu"), torch.float32, None, [1, 2], 4, 6)
    first = calibrate.unit_times(*args)
    assert set(first.decode_layer_s) == {1, 2} and first.layer_load_s >= 0
    m1 = measure.measure_machine(tmp_path / "off")
    assert m1.disk_gbps > 0 and m1.matmul_gflops > 0

    def fail(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(calibrate, "_measure", fail)
    monkeypatch.setattr(measure, "disk_gbps", fail)
    assert calibrate.unit_times(*args) == first
    assert measure.measure_machine(tmp_path / "off") == m1
    with pytest.raises(AssertionError, match="measured again"):
        calibrate.unit_times(*args[:-3], [1, 2, 4], 4, 6)  # a new batch size is measured


def test_errors(bf16_model, tmp_path):
    with pytest.raises(LayercakeError, match="not --percent"):
        layercake.load(bf16_model, policy="auto", percent=(0, 0, 100, 0, 100, 0))
    with pytest.raises(LayercakeError, match="unknown policy"):
        layercake.load(bf16_model, policy="fast", cpu_memory="1GB")
    with pytest.raises(LayercakeError, match="needs a memory budget"):
        layercake.load(bf16_model, policy="auto")
    with pytest.raises(LayercakeError, match="too small"):
        layercake.load(bf16_model, policy="auto", cpu_memory="100KB", offload_dir=tmp_path)


def test_cli_plan_json_and_errors(bf16_model, tmp_path, capsys):
    from layercake.cli import main

    m = synthetic(bf16_model)
    budget = _budgets(m)[1]
    argv = ["plan", "--model", str(bf16_model), "--cpu-memory", str(budget), "--offload-dir",
            str(tmp_path / "off"), "--prompt-len", "4", "--gen-len", "4",
            "--max-sequences", "4"]  # fmt: skip
    assert main(argv + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["predicted_tok_s"] > 0 and out["predicted_memory_bytes"] <= budget
    assert out["flags"].startswith("--percent") and out["block"] <= 4
    assert main(argv) == 0
    assert "predicted:" in capsys.readouterr().out
    assert main(["plan", "--model", str(bf16_model), "--cpu-memory", "10KB"]) == 2
    assert "too small" in capsys.readouterr().err


def test_compression_is_considered_only_when_allowed(bf16_model, tmp_path):
    from layercake.offload.auto import auto_plan
    from layercake.options import Options
    from layercake.quant import compression

    ckpt = open_checkpoint(bf16_model)
    config = load_config(ckpt.config_dict())
    m = synthetic(bf16_model)
    budget = _budgets(m)[1]
    o = Options(cpu_memory=budget, offload_dir=tmp_path / "off")
    kw = dict(o=o, ckpt=ckpt, config=config, parts=Parts.full(config.num_hidden_layers),
              workload=Workload(4, 4, 4))  # fmt: skip
    lossless = auto_plan(compress=[None], **kw)
    assert lossless.compress is None
    both = auto_plan(compress=[None, compression(True, group_size=32)], **kw)
    assert both.throughput >= lossless.throughput - 1e-9
    assert replace(both, alternatives=[]).total_memory <= budget


def test_cli_generate_policy_auto(tiny_chat_llama, tmp_path, capsys):
    from layercake.cli import main

    argv = ["generate", "--model", str(tiny_chat_llama), "--prompt", "w1 w2 w3",
            "--max-new-tokens", "3", "--cpu-memory", "50MB", "--offload-dir", str(tmp_path),
            "--max-context", "16"]  # fmt: skip
    assert main(argv + ["--policy", "auto"]) == 0
    auto = capsys.readouterr().out
    assert main(argv[:-6]) == 0  # in memory
    assert capsys.readouterr().out == auto
    assert main(argv + ["--policy", "auto", "--percent", "0", "0", "100", "0", "100", "0"]) == 2
    assert "not --percent" in capsys.readouterr().err

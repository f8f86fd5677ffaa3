"""Routed experts as offload units (``layercake/offload/experts.py``): under every placement the
offloaded MoE families give the in-memory run's greedy tokens and logits, read only the experts
the router chose (each once per pass), and move the hottest into RAM."""

from __future__ import annotations

import pytest
import torch
from test_moe_models import CASES, save_tiny

import layercake

PROMPTS = [[5, 17, 33, 2, 61, 8, 40, 11], [7, 8, 9, 10, 11, 12, 13, 14], [3, 1, 4, 1, 5, 9, 2, 6]]
STEPS = 12
FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "olmoe-stacked"]


@pytest.fixture(scope="module", params=FAMILIES, ids=FAMILIES)
def tiny(request, tmp_path_factory):
    model_type, cfg, stacked = CASES[request.param]
    path = save_tiny(tmp_path_factory.mktemp(request.param), model_type, cfg, stacked)
    ref = layercake.load(path)
    out = ref.generate(PROMPTS, max_new_tokens=STEPS, ignore_eos=True)
    return path, [r.token_ids for r in out], ref.logits(PROMPTS)


@pytest.mark.parametrize("percent", [0, 50])
def test_offloaded_experts_equal_in_memory(tiny, tmp_path, percent):
    path, tokens, logits = tiny
    llm = layercake.load(path, percent=[0, percent, 100, 0, 100, 0], offload_dir=tmp_path,
                         batch_size=3)  # fmt: skip
    out = llm.generate(PROMPTS, max_new_tokens=STEPS, ignore_eos=True)
    assert [r.token_ids for r in out] == tokens
    torch.testing.assert_close(llm.logits(PROMPTS), logits, atol=1e-4, rtol=1e-4)
    r = llm.runner
    assert any(u.kind == "expert" for u in r.units)  # experts are units of their own
    st = r.experts.stats()
    assert 0 < st["experts_read_per_layer"] <= st["experts_routed_per_layer"]
    if percent == 0:  # every chosen expert read once per pass, nothing else
        assert st["experts_read_per_layer"] == st["experts_routed_per_layer"]
    else:
        assert st["experts_read_per_layer"] < st["experts_routed_per_layer"]


def test_unchosen_experts_are_not_read(tmp_path):
    """One row, top-2 of 8: a decode pass reads at most two experts per layer, not eight,
    and reads each as one unit's bytes."""
    model_type, cfg, stacked = CASES["olmoe"]
    path = save_tiny(tmp_path / "m", model_type, cfg, stacked)
    llm = layercake.load(path, percent=[0, 0, 100, 0, 100, 0], offload_dir=tmp_path / "o",
                         batch_size=1)  # fmt: skip
    r = llm.runner

    def reads(new: int) -> tuple[int, int]:
        n0, b0 = r.experts.reads, r.expert_loader.bytes_read
        llm.generate(PROMPTS[:1], max_new_tokens=new, ignore_eos=True)
        return r.experts.reads - n0, r.expert_loader.bytes_read - b0

    (p1, pb1), (p2, pb2) = reads(1), reads(2)  # the prompt; the prompt and one decode pass
    layers = len(r.experts.layers)
    assert 0 < p2 - p1 <= layers * cfg["num_experts_per_tok"]
    expert_bytes = max(rng[1] for rng in r.expert_loader.ranges.values())
    assert pb2 - pb1 == pytest.approx((p2 - p1) * expert_bytes, rel=0.01)


def test_hottest_experts_move_into_ram(tmp_path):
    """With some of each layer's experts in RAM, routing counts decide which."""
    model_type, cfg, stacked = CASES["olmoe"]
    path = save_tiny(tmp_path / "m", model_type, cfg, stacked)
    llm = layercake.load(path, percent=[0, 50, 100, 0, 100, 0], offload_dir=tmp_path / "o",
                         batch_size=3)  # fmt: skip
    llm.generate(PROMPTS, max_new_tokens=STEPS, ignore_eos=True)
    xu = llm.runner.experts
    for i in xu.layers:
        c = xu.counts[i].tolist()
        held = [e for e in range(len(c)) if not xu.on_disk(xu.unit[i, e])]
        cold = [e for e in range(len(c)) if xu.on_disk(xu.unit[i, e])]
        assert 0 < len(held) < len(c)  # the always-run weights first, then whole experts
        assert min(c[e] for e in held) >= max(c[e] for e in cold) or xu.passes % 4
    xu.rebalance()  # now, whatever the passes since the last one
    for i in xu.layers:
        c = xu.counts[i].tolist()
        held = [c[e] for e in range(len(c)) if not xu.on_disk(xu.unit[i, e])]
        cold = [c[e] for e in range(len(c)) if xu.on_disk(xu.unit[i, e])]
        assert min(held) >= max(cold)
    out = llm.generate(PROMPTS, max_new_tokens=STEPS, ignore_eos=True)  # still the same tokens
    ref = layercake.load(path).generate(PROMPTS, max_new_tokens=STEPS, ignore_eos=True)
    assert [r.token_ids for r in out] == [r.token_ids for r in ref]


def test_always_run_weights_before_experts():
    """The RAM share goes to attention, router and head first, then to whole experts, the
    same count per layer; never more bytes than the policy's share."""
    from layercake.offload.experts import resident_bytes
    from layercake.offload.store import Entry, Unit

    def unit(name, kind, index, nbytes):
        return Unit(name, kind, index, (Entry("w", "w", (nbytes,), "uint8", 0, 0),))

    units = []
    for i in range(2):
        units.append(unit(f"layer.{i}", "layer", i, 100))
        units += [unit(f"layer.{i}.expert.{e}", "expert", i, 50) for e in range(4)]
    units.append(unit("head.0", "head", 0, 100))
    W = sum(u.nbytes for u in units)  # 700
    split = resident_bytes(units, 0, 100 * 500 / W)  # 500 bytes of RAM
    held = {units[j].name for j, (d, c) in split.items() if d + c == units[j].nbytes}
    assert {"layer.0", "layer.1", "head.0"} <= held
    assert sum(d + c for d, c in split.values()) <= 500
    assert sorted(n for n in held if "expert" in n) == [
        "layer.0.expert.0",
        "layer.0.expert.1",
        "layer.1.expert.0",
        "layer.1.expert.1",
    ]
    small = resident_bytes(units, 0, 100 * 200 / W)  # less than the always-run units
    assert sum(d + c for d, c in small.values()) <= 200
    assert resident_bytes([unit("layer.0", "layer", 0, 10)], 0, 50) is None

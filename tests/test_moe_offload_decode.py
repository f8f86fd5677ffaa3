"""Offloaded routed experts at decode: the extra experts one-token steps hold in the room a
prompt's pass needs and a step does not (``footprint.decode_room``, ``experts.decode_extra``)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from test_moe_offload import PROMPTS, STEPS, _tiny_offloaded

from layercake.offload.experts import decode_extra
from layercake.offload.footprint import Footprint, decode_room
from layercake.offload.tiers import align_up


def _held(xu, layer: int) -> int:
    return sum(not xu.on_disk(xu.unit[layer, e]) for e in range(len(xu.counts[layer])))


def test_decode_steps_hold_extra_experts_a_prompt_gives_back(tmp_path):
    """One-token steps keep up to ``decode_extra`` more experts (spread over the layers, the
    first ones one more), each the hottest on disk when next read anyway (nothing read for it:
    fewer reads than without, same tokens and logits); a pass of several tokens per row sends
    them back to disk first (the prompt's activations take that room)."""
    _, ref = _tiny_offloaded(tmp_path / "ref", 25)
    want = ref.generate(PROMPTS, max_new_tokens=STEPS, ignore_eos=True)
    _, llm = _tiny_offloaded(tmp_path / "new", 25)
    xu = llm.runner.experts
    assert xu.decode_extra == 0  # a fixed placement (percent): no room planned
    base = {i: _held(xu, i) for i in xu.layers}
    xu.decode_extra = 2 * len(xu.layers) - 1
    out = llm.generate(PROMPTS, max_new_tokens=STEPS, ignore_eos=True)
    assert [r.token_ids for r in out] == [r.token_ids for r in want]
    assert xu.reads < ref.runner.experts.reads  # kept ones were not read again
    assert sum(xu.grown.values()) > 0
    for i in xu.layers:
        assert xu.grown.get(i, 0) <= (2 if i != xu.layers[-1] else 1)
        assert _held(xu, i) == base[i] + xu.grown.get(i, 0)
    torch.testing.assert_close(llm.logits(PROMPTS), ref.logits(PROMPTS), atol=0, rtol=0)
    assert not xu.grown and all(_held(xu, i) == base[i] for i in xu.layers)  # given back


def test_decode_extra_counts_experts_of_the_largest_size():
    units = [SimpleNamespace(kind="expert", index=i, nbytes=1000 + i) for i in range(3)]
    units.append(SimpleNamespace(kind="layer", index=0, nbytes=10**9))
    per = align_up(1002)
    assert decode_extra(units, 5 * per - 1) == 4
    assert decode_extra(units, 5 * per) == 5
    assert decode_extra(units[3:], 10**12) == 0


def test_decode_room_is_the_prompts_activations_and_headroom_a_step_leaves():
    fp = Footprint(weights=10**9, compute_ratio=2.0, max_unit=10**7, activations=130 * 10**6,
                   kv=0, expert_staging=5 * 10**7, headroom=100 * 2**20,
                   step_activations=38 * 10**6)  # fmt: skip
    assert decode_room(fp) == 92 * 10**6 + 100 * 2**20
    dense = Footprint(weights=10**9, compute_ratio=2.0, max_unit=10**7, activations=10**8, kv=0)
    assert decode_room(dense) == 0  # no routed experts: nothing held at decode


def test_step_activations_are_a_one_token_pass_of_the_block(tmp_path):
    """``footprint``'s step figure is what it plans for a pass of one token per row of the
    whole block (a decode step runs the block as one micro-batch)."""
    import json

    from test_moe_models import CASES, save_tiny

    from layercake.checkpoint import open_checkpoint
    from layercake.config import load_config
    from layercake.models.parts import Parts
    from layercake.offload.footprint import footprint

    model_type, cfg, stacked = CASES["olmoe"]
    path = save_tiny(tmp_path / "m", model_type, cfg, stacked)
    ck = open_checkpoint(path)
    c = load_config(json.loads((path / "config.json").read_text()))
    parts = Parts.full(c.num_hidden_layers)
    kw = dict(int4pack=True)
    fp = footprint(ck, c, parts, torch.float32, 3, 2, 24, pass_tokens=8, **kw)
    one = footprint(ck, c, parts, torch.float32, 6, 1, 24, pass_tokens=1, **kw)
    assert fp.step_activations == one.activations < fp.activations
    assert decode_room(fp) == fp.activations - one.activations + fp.headroom


def test_first_step_after_a_prompt_trims_the_heap(tmp_path, monkeypatch):
    """The heap is trimmed after the first one-token step that follows a prompt's pass (that
    step let go of the prompt's choice rows, ``RowsBuffer``, after the pass's own trim), and
    not after every step."""
    import layercake.offload.executor as ex

    _, llm = _tiny_offloaded(tmp_path, 25)
    calls: list[int] = []
    monkeypatch.setattr(ex, "trim_heap", lambda: calls.append(len(llm.runner.passes)))
    llm.generate(PROMPTS, max_new_tokens=4, ignore_eos=True)
    # (passes recorded when it trimmed) the prompt's heap pass on leaving, then its first step
    assert calls == [0, 1]

"""Routed experts as offload units (``layercake/offload/experts.py``): under every placement the
offloaded MoE families give the in-memory run's greedy tokens and logits, read only the experts
the router chose (each once per pass), and move the hottest into RAM."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_moe_models import CASES, save_tiny

import layercake
from layercake.offload.experts import ExpertUnits
from layercake.ops import kernels
from layercake.ops import linear as ops_linear

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
    xu = r.experts
    chosen_read = xu.reads - xu.wasted  # reads ahead the router then did not choose: wasted
    assert 0 < chosen_read <= xu.routed
    if percent == 0:  # every chosen expert read once per pass, nothing else
        assert chosen_read == xu.routed
        assert xu.read_ahead > 0  # the prompt's rows choose nearly every expert
    else:
        assert chosen_read < xu.routed


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
    moved, read = xu.moved, xu.loader.bytes_read
    for i in xu.layers:  # moves decided; each done when its expert is next read anyway
        c = xu.counts[i].tolist()
        into, out = set(xu.swaps[i]), set(xu.swaps[i].values())
        now = {j for j in (xu.unit[i, e] for e in range(len(c))) if not xu.on_disk(j)}
        held = [c[e] for e in range(len(c)) if xu.unit[i, e] in (now - out) | into]
        cold = [c[e] for e in range(len(c)) if xu.unit[i, e] not in (now - out) | into]
        assert min(held) >= max(cold)
    assert xu.loader.bytes_read == read  # nothing read to decide
    pending = sum(len(v) for v in xu.swaps.values())
    out = llm.generate(PROMPTS, max_new_tokens=STEPS, ignore_eos=True)  # still the same tokens
    assert xu.moved > moved or not pending
    ref = layercake.load(path).generate(PROMPTS, max_new_tokens=STEPS, ignore_eos=True)
    assert [r.token_ids for r in out] == [r.token_ids for r in ref]


def test_expert_moved_to_disk_lets_its_rows_go(tmp_path):
    """When an expert read anyway moves into RAM, the one it replaces lets its RAM go at once:
    its module no longer holds its rows (else every move of a pass sits on top of the budget
    until the replaced expert is next read), and the next run binds it from its read."""
    path, llm = _tiny_offloaded(tmp_path, 50)
    llm.generate(PROMPTS, max_new_tokens=1, ignore_eos=True)
    xu, r = llm.runner.experts, llm.runner
    for i in xu.layers:  # the last experts are the hot ones: moves are due
        xu.counts[i] = torch.arange(len(xu.counts[i])) * 100
    xu.rebalance()
    layer = next(i for i in xu.layers if xu.swaps[i])
    into, out = next(iter(xu.swaps[layer].items()))
    r.materialize(out, None)  # bound from RAM, as when it last ran
    e_out = next(e for (i, e), j in xu.unit.items() if (i, j) == (layer, out))
    module = r.model.layers()[str(layer)].mlp.experts[e_out]
    linears = [m for m in module.modules() if hasattr(m, "weight")]
    assert all(m.weight is not None for m in linears)
    try:
        assert xu.promote(layer, into, xu.loader.wait(into))
    finally:
        xu.loader.free(into)
    assert all(m.weight is None for m in linears)
    ref = layercake.load(path).generate(PROMPTS, max_new_tokens=STEPS, ignore_eos=True)
    out_ = llm.generate(PROMPTS, max_new_tokens=STEPS, ignore_eos=True)
    assert [x.token_ids for x in out_] == [x.token_ids for x in ref]


def test_always_run_weights_before_experts():
    """The RAM share goes to attention, router and head first, then to whole experts, the
    same count per layer and one more in as many layers as the rest holds; never more bytes
    than the policy's share."""
    from layercake.offload.experts import resident_bytes

    units = moe_units(4)
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
    odd = resident_bytes(units, 0, 100 * 580 / W)  # the rest (80 bytes) holds one expert more
    held = {units[j].name for j, (d, c) in odd.items() if d + c == units[j].nbytes}
    assert "layer.0.expert.2" in held and "layer.1.expert.2" not in held
    assert sum(d + c for d, c in odd.values()) <= 580
    small = resident_bytes(units, 0, 100 * 200 / W)  # less than the always-run units
    assert sum(d + c for d, c in small.values()) <= 200
    assert resident_bytes(moe_units(0)[:1], 0, 50) is None


def test_run_order_changes_nothing_but_the_order():
    from layercake.models.moe import grouped

    torch.manual_seed(0)
    experts = torch.nn.ModuleList(torch.nn.Linear(6, 6) for _ in range(5))
    x, ids = torch.randn(7, 6), torch.randint(0, 5, (7, 2))
    w = torch.rand(7, 2)
    calls = []
    for e, m in enumerate(experts):
        _log_calls(m, lambda e=e: calls.append(e))
    want = grouped(x, ids, w, experts)
    chosen = sorted(set(ids.flatten().tolist()))
    assert calls == chosen
    calls.clear()
    got = grouped(x, ids, w, experts, run_order=chosen[::-1])
    assert calls == chosen[::-1]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_grouped_rows_buffer_is_reused_and_changes_nothing():
    """With a ``RowsBuffer`` the choices' rows are gathered into one kept buffer (grown only
    when a call needs more): the same sums, bit for bit, and no new buffer for a smaller call;
    a call needing less than a quarter of it lets it go for one of its own size."""
    from layercake.models.moe import RowsBuffer, grouped

    torch.manual_seed(2)
    experts = torch.nn.ModuleList(torch.nn.Linear(6, 6) for _ in range(5))
    rows = RowsBuffer()
    for n in (9, 4):  # as the engine runs: no autograd (the buffer outlives the call)
        x, ids, w = torch.randn(n, 6), torch.randint(0, 5, (n, 2)), torch.rand(n, 2)
        with torch.inference_mode():
            if rows.buf is not None:
                ptr = rows.buf.fill_(float("nan")).data_ptr()
            want = grouped(x, ids, w, experts)
            got = grouped(x, ids, w, experts, rows=rows)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert rows.buf.shape == (18, 6) and rows.buf.data_ptr() == ptr
    assert not rows.buf[:8].isnan().any() and rows.buf[8:].isnan().all()  # used, not grown
    with torch.inference_mode():
        grouped(x[:2], ids[:2], w[:2], experts, rows=rows)  # 4 rows < 18 / 4
    assert rows.buf.shape == (4, 6)


@pytest.mark.parametrize("chunk", [2048, 5, 1])
def test_grouped_is_each_rows_weighted_sum(monkeypatch, chunk):
    """The choices' buffer is overwritten by the experts' outputs and gathered back a chunk of
    rows at a time (``GATHER_CHOICES``, here also smaller than the rows): each row still gets
    the weighted sum of its own k experts."""
    from layercake.models import moe

    monkeypatch.setattr(moe, "GATHER_CHOICES", chunk)
    torch.manual_seed(1)
    experts = torch.nn.ModuleList(torch.nn.Linear(6, 6) for _ in range(5))
    x, ids = torch.randn(9, 6), torch.randint(0, 5, (9, 2))
    w = torch.rand(9, 2)
    want = torch.stack(
        [sum(w[n, j] * experts[int(ids[n, j])](x[n]) for j in range(2)) for n in range(9)]
    )
    with torch.no_grad():
        torch.testing.assert_close(moe.grouped(x, ids, w, experts), want)


def moe_units(experts: int) -> list:
    """Two layers of 100 bytes, each with ``experts`` experts of 50 bytes, and a head of 100."""
    from layercake.offload.store import Entry, Unit

    def unit(name, kind, index, nbytes):
        return Unit(name, kind, index, (Entry("w", "w", (nbytes,), "uint8", 0, 0),))

    units = []
    for i in range(2):
        units.append(unit(f"layer.{i}", "layer", i, 100))
        units += [unit(f"layer.{i}.expert.{e}", "expert", i, 50) for e in range(experts)]
    return units + [unit("head.0", "head", 0, 100)]


def _log_calls(m: torch.nn.Module, note) -> None:
    """``grouped`` calls an expert's ``forward`` directly (no hooks): wrap it."""
    f = m.forward

    def forward(*a):
        note()
        return f(*a)

    m.forward = forward


def _tiny_offloaded(tmp_path, percent, batch_size=3):
    model_type, cfg, stacked = CASES["olmoe"]
    path = save_tiny(tmp_path / "m", model_type, cfg, stacked)
    llm = layercake.load(path, percent=[0, percent, 100, 0, 100, 0], offload_dir=tmp_path / "o",
                         batch_size=batch_size)  # fmt: skip
    return path, llm


def test_experts_run_as_their_reads_arrive(tmp_path):
    """Per layer call, every chosen expert runs once: the read ones in the loader's order, each
    as soon as its read is done, held ones while the next read is still in progress (the ring
    is not left full while held experts compute)."""
    _, llm = _tiny_offloaded(tmp_path, 50)
    xu = llm.runner.experts
    for i in xu.layers:  # the last experts held, not the first (expert order is not the answer)
        xu.counts[i] = torch.arange(len(xu.counts[i])) * 100
    xu.rebalance()
    llm.generate(PROMPTS, max_new_tokens=1, ignore_eos=True)  # the moves happen as they are read
    assert xu.moved > 0
    runs: list[list[tuple[int, bool]]] = []  # per run_experts call: (expert, read) in order
    for i in xu.layers:
        moe = llm.runner.model.layers()[str(i)].mlp
        run = moe.run_experts
        moe.run_experts = lambda *a, run=run: (runs.append([]), run(*a))[1]
        for e, m in enumerate(moe.experts):
            _log_calls(m, lambda i=i, e=e: runs[-1].append((e, xu.on_disk(xu.unit[i, e]))))
    llm.generate(PROMPTS, max_new_tokens=3, ignore_eos=True)
    assert any(c for r in runs for _, c in r) and any(not c for r in runs for _, c in r)
    for r in runs:  # each chosen expert once a call (the order: the stub below)
        assert len({e for e, _ in r}) == len(r)

    class Reads:  # reads done: those in ``done``
        def __init__(self) -> None:
            self.done: set[int] = set()

        def ready(self, unit: int) -> bool:
            return unit in self.done

    stub = SimpleNamespace(loader=Reads(), unit={(0, e): e for e in range(8)}, unrun=set())
    order = ExpertUnits.order(stub, 0, [1, 2, 3], [5, 6, 7])
    assert next(order) == 1  # read 5 not done: a held one
    stub.loader.done |= {5, 6}
    assert [next(order), next(order)] == [5, 6]  # done reads first, in the loader's order
    assert next(order) == 2  # 7 still being read
    assert list(order) == [3, 7]  # held ones left, then the last read (waited for)


def test_reads_ahead_not_chosen_are_handed_back(tmp_path, monkeypatch):
    """Every cold expert of the next layer read ahead (more than the ring holds): the ones the
    router then does not choose are handed back in order, nothing waits forever, the tokens
    are the in-memory run's and every slot is free after the pass."""
    from layercake.offload import experts, placement

    monkeypatch.setattr(experts, "READ_AHEAD_P", 0.0)
    monkeypatch.setattr(placement, "expert_slots", lambda nbytes: 2)
    path, llm = _tiny_offloaded(tmp_path, 0, batch_size=1)
    out = llm.generate(PROMPTS[:1], max_new_tokens=STEPS, ignore_eos=True)
    ref = layercake.load(path).generate(PROMPTS[:1], max_new_tokens=STEPS, ignore_eos=True)
    assert out[0].token_ids == ref[0].token_ids
    xu = llm.runner.experts
    assert xu.wasted > 0 and xu.reads - xu.wasted == xu.routed
    # what is still in the ring: the next pass's first layer, read ahead across passes
    ahead = xu.ahead.get(xu.layers[0], [])
    assert ahead and set(xu.loader.inflight) == {xu.unit[xu.layers[0], e] for e in ahead}
    again = llm.generate(PROMPTS[:1], max_new_tokens=STEPS, ignore_eos=True)  # they are used
    assert again[0].token_ids == ref[0].token_ids


def test_footprint_counts_the_rows_per_chosen_expert(tmp_path):
    """A MoE block's activations include its tokens' rows once per chosen expert (``grouped``
    gathers them and computes over them in place): one such buffer at the planned context, or a
    budget-sized run is killed at a memory cap."""
    from layercake.checkpoint import open_checkpoint
    from layercake.config import load_config
    from layercake.models.parts import parse_parts
    from layercake.offload.footprint import EXPERT_CACHE_HEADROOM, EXPERT_DECODE_ROOM, footprint

    model_type, cfg, stacked = CASES["olmoe"]
    path = save_tiny(tmp_path / "m", model_type, cfg, stacked)
    ckpt = open_checkpoint(path)
    config = load_config(ckpt.config_dict())
    parts = parse_parts("f", config.num_hidden_layers)
    small, big = (footprint(ckpt, config, parts, torch.float32, bs, 1, 24) for bs in (1, 8))
    rows = 4 * 24 * cfg["num_experts_per_tok"] * cfg["hidden_size"]
    assert big.activations - small.activations >= 7 * rows
    # kept free for the page cache: 100 MiB, and with a prompt's activations (free at decode)
    # at least EXPERT_DECODE_ROOM (a small block's decode thrashed with less; see footprint)
    assert big.headroom == max(EXPERT_CACHE_HEADROOM, EXPERT_DECODE_ROOM - big.activations)
    assert big.headroom + big.activations >= EXPERT_DECODE_ROOM


def test_plan_for_the_jobs_prompt_leaves_more_to_experts(tmp_path):
    """``pass_tokens`` (``--pass-tokens``: the job's longest prompt) plans the activations of a
    pass of that many tokens, not of the whole context: at B=64 with a 16-token prompt and 8
    generated, 50 MB of OLMoE's plan go to weights (4 experts; moe8). A prompt of that length
    runs in one pass: the same tokens as in memory."""
    from layercake.checkpoint import open_checkpoint
    from layercake.config import load_config
    from layercake.models.parts import parse_parts
    from layercake.offload.footprint import footprint

    model_type, cfg, stacked = CASES["olmoe"]
    path = save_tiny(tmp_path / "m", model_type, cfg, stacked)
    ckpt = open_checkpoint(path)
    config = load_config(ckpt.config_dict())
    parts = parse_parts("f", config.num_hidden_layers)
    whole, job = (footprint(ckpt, config, parts, torch.float32, 64, 1, 24, pass_tokens=t)
                  for t in (None, 16))  # fmt: skip
    rows = 64 * 8 * (cfg["num_experts_per_tok"] + 2 + 2) * cfg["hidden_size"] * 4
    # per token and row not planned: its k expert rows, its hidden states and intermediates
    assert whole.activations - job.activations >= rows
    ref = layercake.load(path).generate(PROMPTS, max_new_tokens=4, ignore_eos=True)
    llm = layercake.load(path, percent=[0, 0, 100, 0, 100, 0], offload_dir=tmp_path / "o",
                         batch_size=3, max_context=12, pass_tokens=len(PROMPTS[0]))  # fmt: skip
    out = llm.generate(PROMPTS, max_new_tokens=4, ignore_eos=True)
    assert [r.token_ids for r in out] == [r.token_ids for r in ref]
    assert llm.runner.experts.passes == 4  # the prompt in one pass, then 3 steps


def test_expert_ring_depth_follows_expert_size():
    """Four buffers for small experts (OLMoE's 12.6 MB), as many as 128 MiB holds for bigger
    ones, never fewer than the three of the layers' ring (Mixtral's 352 MB experts)."""
    from layercake.offload.policy import STAGING_SLOTS, expert_slots

    assert expert_slots(12_582_912) == 4
    assert expert_slots(40 * 2**20) == 3
    assert expert_slots(352 * 2**20) == STAGING_SLOTS == 3


@pytest.mark.skipif(not kernels.available() or not kernels.amx(), reason="no AMX-BF16 here")
def test_bf16_experts_multiply_on_amx_tiles(tmp_path, monkeypatch):
    """Offloaded bf16 experts (in RAM and read) run every product of 2 rows or more on the AMX
    kernel (``kernels.bf16_linear``), a prompt's many rows per expert included: none is
    widened for MKL (``ops.linear.WIDEN_ROWS``), which only serves machines without AMX."""
    model_type, cfg, stacked = CASES["olmoe"]
    path = save_tiny(tmp_path / "m", model_type, cfg, stacked)
    for f in path.glob("*.safetensors"):
        save_file({k: v.bfloat16() for k, v in load_file(f).items()}, f, {"format": "pt"})
    conf = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**conf, "dtype": "bfloat16"}))
    tiles, widened = (
        _logged(monkeypatch, kernels, "bf16x3_mm"),
        _logged(monkeypatch, ops_linear, "_widened"),
    )
    llm = layercake.load(path, percent=[0, 50, 100, 0, 100, 0], offload_dir=tmp_path / "o",
                         batch_size=8)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, conf["vocab_size"], (8, 48), generator=gen)
    llm.generate(prompts.tolist(), max_new_tokens=2, ignore_eos=True)
    size, hidden = cfg["intermediate_size"], cfg["hidden_size"]
    down = [rows for rows, shape in tiles if shape == (hidden, size)]
    assert not widened
    assert max(down) >= ops_linear.WIDEN_ROWS  # a prompt's expert had many rows: still tiles
    assert len(down) >= cfg["num_experts"]  # experts of the prompt's pass and of decode


def _logged(monkeypatch, module, name: str) -> list[tuple[int, tuple]]:
    """Wrap ``module.name(x, w, ...)`` to log (rows of x, shape of w) per call."""
    calls, real = [], getattr(module, name)

    def f(x, w, *a, **k):
        calls.append((x.reshape(-1, x.shape[-1]).shape[0], tuple(getattr(w, "shape", ()))))
        return real(x, w, *a, **k)

    monkeypatch.setattr(module, name, f)
    return calls


def test_first_layer_is_read_ahead_of_its_router(tmp_path):
    """A pass whose rows choose every expert queues the first layer's cold experts before the
    embedding and the first attention run, as every later layer's: no read of the prompt's pass
    waits for a router."""
    _, llm = _tiny_offloaded(tmp_path, 0)
    xu = llm.runner.experts
    llm.generate(PROMPTS, max_new_tokens=1, ignore_eos=True)  # the prompt's pass: 24 rows
    assert xu.reads == xu.read_ahead == len(xu.layers) * len(xu.counts[xu.layers[0]])

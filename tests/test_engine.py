"""Continuous batching: cache shifts, and every sequence equal to its solo run whatever shares
the batch, joins or leaves it."""

from __future__ import annotations

import random

import pytest
import torch

from layercake.engine import Engine, Request, batch_buckets, move_row
from layercake.errors import LayercakeError
from layercake.kv_cache import KVCache
from layercake.sampling import Sampler, SamplingParams


def _cache(length: int, capacity: int = 12) -> KVCache:
    c = KVCache.allocate([0, 3], batch=2, capacity=capacity, num_kv_heads=1, head_dim=2)
    for t in c.tensors():
        t.copy_(torch.randn_like(t))
    c.valid[:, :length] = torch.rand(2, length) > 0.3
    c.length = length
    return c


@pytest.mark.parametrize(
    "length,offset", [(7, -1), (7, -3), (7, -7), (9, -2), (5, 2), (5, 7), (8, 3), (1, 4), (0, 3)]
)
def test_shift_moves_rows_in_place(length, offset):
    c = _cache(length)
    before = {i: t.clone() for i, t in enumerate(c.tensors())}
    valid = c.valid.clone()
    ptrs = [t.data_ptr() for t in c.tensors()]
    c.shift(offset)
    assert c.length == length + offset and [t.data_ptr() for t in c.tensors()] == ptrs
    lo = max(0, -offset)  # source slots that survive
    for i, t in enumerate(c.tensors()):
        assert torch.equal(t[:, :, lo + offset : length + offset], before[i][:, :, lo:length])
    assert torch.equal(c.valid[:, lo + offset : length + offset], valid[:, lo:length])
    assert not c.valid[:, : max(0, offset)].any()
    assert not c.valid[:, length + offset : max(length, length + offset)].any()


def test_shift_beyond_capacity_raises():
    with pytest.raises(ValueError):
        _cache(10).shift(3)


def test_load_rows_copies_into_scattered_rows():
    c = _cache(6)
    c.valid[:] = True
    src = KVCache.allocate([0, 3], batch=2, capacity=4, num_kv_heads=1, head_dim=2)
    for t in src.tensors():
        t.copy_(torch.randn_like(t))
    src.valid[:, :3] = torch.tensor([[False, True, True], [True, True, True]])
    src.length = 3
    keep = c.keys[0][1].clone()
    c2 = KVCache.allocate([0, 3], batch=3, capacity=12, num_kv_heads=1, head_dim=2)
    c2.length = 6
    c2.load_rows(torch.tensor([2, 0]), src, at=3)
    assert torch.equal(c2.keys[0][2, :, 3:6], src.keys[0][0, :, :3])
    assert torch.equal(c2.values[3][0, :, 3:6], src.values[3][1, :, :3])
    assert c2.valid[2].tolist() == [False] * 4 + [True] * 2 + [False] * 6
    assert torch.equal(c.keys[0][1], keep)


@pytest.fixture(scope="module")
def llm(tiny_llama):
    import layercake

    return layercake.load(tiny_llama)


def _solo(llm, prompt, params):
    kw = {
        k: getattr(params, k)
        for k in (
            "max_new_tokens",
            "temperature",
            "top_p",
            "seed",
            "logprobs",
            "ignore_eos",
            "top_k",
        )
    }
    return llm.generate([prompt], **kw)[0]


def assert_solo(llm, reqs, out):
    """Each request's events (``out[id(r)]``) carry its solo run's tokens and logprobs."""
    for r in reqs:
        solo = _solo(llm, r.prompt, r.params)
        assert [e.token_id for e in out[id(r)]] == solo.token_ids, r.tag
        if r.params.logprobs is not None:
            got = [e.logprob.logprob for e in out[id(r)]]
            assert got == pytest.approx([lp.logprob for lp in solo.logprobs], abs=1e-4)


def _run(llm, reqs, slots, capacity):
    eng = Engine(llm.runner, llm.eos_token_ids, lambda ids: "", slots, capacity)
    for r in reqs:
        eng.add(r)
    out = {id(r): [] for r in reqs}
    finish = {}
    for req, ev in eng.run():
        out[id(req)].append(ev)
        if ev.finish_reason:
            assert id(req) not in finish, "events after the end"
            finish[id(req)] = ev.finish_reason
    assert len(finish) == len(reqs) and all(r.finished for r in reqs)
    return eng, out


@pytest.mark.parametrize("slots,capacity", [(3, 27), (4, 25), (16, 64)])
def test_continuous_batching_equals_solo_greedy(llm, slots, capacity, monkeypatch):
    calls = []
    for name in ("shift", "load_rows", "rows"):
        orig = getattr(KVCache, name)
        monkeypatch.setattr(
            KVCache,
            name,
            lambda self, *a, _o=orig, _n=name: (
                calls.append((_n, a[0] if _n == "shift" else None)),
                _o(self, *a),
            )[1],
        )
    rng = random.Random(slots)
    reqs = []
    for i in range(16):
        prompt = [rng.randrange(3, 97) for _ in range(rng.randrange(1, 14))]
        n = rng.randrange(1, 12) if i >= slots else (3 if i % 2 == 0 else 9)  # scattered frees
        p = SamplingParams(
            temperature=0.0, max_new_tokens=n, ignore_eos=True, logprobs=2 if i % 3 == 0 else None
        )
        reqs.append(Request(prompt, p, tag=i))
    eng, out = _run(llm, reqs, slots, capacity)
    assert eng.stats.generated_tokens == sum(r.params.max_new_tokens for r in reqs)
    if slots < 10:  # every path taken: scattered admissions, shifts both ways
        kinds = {n if n != "shift" else f"shift{'+' if a > 0 else '-'}" for n, a in calls}
        assert kinds == {"rows", "load_rows", "shift+", "shift-"}, kinds
    assert_solo(llm, reqs, out)


def test_seeded_sampling_equals_solo(llm):
    reqs = [
        Request(
            [5 + i, 9, 11 + i][: 1 + i % 3],
            SamplingParams(
                temperature=0.9, top_p=0.9, seed=100 + i, max_new_tokens=4 + i, ignore_eos=True
            ),
        )
        for i in range(6)
    ]
    _, out = _run(llm, reqs, slots=2, capacity=20)
    for r in reqs:
        assert [e.token_id for e in out[id(r)]] == _solo(llm, r.prompt, r.params).token_ids


def test_cancel_frees_the_slot(llm):
    eng = Engine(llm.runner, [], lambda ids: "", slots=1, capacity=40)
    a = Request([5, 6], SamplingParams(temperature=0.0, max_new_tokens=20, ignore_eos=True))
    b = Request([7], SamplingParams(temperature=0.0, max_new_tokens=3, ignore_eos=True))
    eng.add(a)
    eng.add(b)
    eng.step()
    a.cancelled = True
    events = eng.run()
    assert {id(r) for r, _ in events} == {id(b)} and b.finished and not a.finished


def test_request_too_long_for_the_engine(llm):
    eng = Engine(llm.runner, [], lambda ids: "", slots=2, capacity=16)
    with pytest.raises(LayercakeError, match="max_new_tokens <= 6"):
        eng.add(Request(list(range(3, 13)), SamplingParams(max_new_tokens=7)))


def test_compaction_after_a_right_shift(llm):
    """A long prompt joins late (the cache shifts right), then the cache fills up and is
    compacted: the live row's first slot must have moved with the shift."""
    g = dict(temperature=0.0, ignore_eos=True)
    a = Request([5], SamplingParams(max_new_tokens=20, **g))
    b = Request([6], SamplingParams(max_new_tokens=1, **g))
    c = Request(list(range(10, 20)), SamplingParams(max_new_tokens=5, **g))
    eng, out = _run(llm, [a, b, c], slots=2, capacity=24)
    for r in (a, b, c):
        assert [e.token_id for e in out[id(r)]] == _solo(llm, r.prompt, r.params).token_ids


def test_cache_follows_the_requests_in_flight(llm):
    """The cache starts small, grows (written slots copied) when a long request joins live
    short ones, and starts small again when a short request comes to the emptied engine; every
    sequence still gets its solo tokens and logprobs."""
    g = dict(temperature=0.0, ignore_eos=True, logprobs=1)
    eng = Engine(llm.runner, [], lambda ids: "", slots=3, capacity=120, initial=16)
    assert eng.cache.capacity == 16
    short = [Request([5 + i, 7], SamplingParams(max_new_tokens=4 + i, **g)) for i in range(2)]
    long = Request(list(range(3, 60)), SamplingParams(max_new_tokens=30, **g))
    late = Request([9], SamplingParams(max_new_tokens=3, **g))
    out = {id(r): [] for r in (*short, long, late)}
    sizes = []
    for r in short:
        eng.add(r)
    for step in range(200):
        if step == 2:
            eng.add(long)
        if step > 2 and not eng.busy:
            eng.add(late)
        for req, ev in eng.step():
            out[id(req)].append(ev)
        sizes.append(eng.cache.capacity)
        if late.finished:
            break
    assert sizes[0] == 16 and max(sizes) >= 87 and sizes[-1] == 16
    for r in (*short, long, late):
        solo = _solo(llm, r.prompt, r.params)
        assert [e.token_id for e in out[id(r)]] == solo.token_ids
        got = [e.logprob.logprob for e in out[id(r)]]
        assert got == pytest.approx([lp.logprob for lp in solo.logprobs], abs=1e-4)


def run_checking_rows(llm, reqs, slots, capacity, rows_for, monkeypatch, **kw):
    """``_run``, asserting at every decode step that the live rows are a prefix of the slots
    and the forward ran ``rows_for(live)`` rows; the decode steps' row counts."""
    forward, eng, seen = llm.runner.forward, None, []

    def spy(tokens, positions, cache, *a, **k):  # noqa: ANN001, ANN002, ANN003
        if eng is not None and positions.data_ptr() == eng.pos.data_ptr():  # a decode step
            n = sum(s is not None for s in eng.seqs)
            assert all(s is not None for s in eng.seqs[:n]), "live rows not a prefix"
            assert tokens.shape[0] == cache.batch == rows_for(n), (tokens.shape, n)
            seen.append(n)
        return forward(tokens, positions, cache, *a, **k)

    monkeypatch.setattr(llm.runner, "forward", spy)
    eng = Engine(llm.runner, llm.eos_token_ids, lambda ids: "", slots, capacity, **kw)
    for r in reqs:
        eng.add(r)
    out = {id(r): [] for r in reqs}
    for req, ev in eng.run():
        out[id(req)].append(ev)
    monkeypatch.undo()
    assert_solo(llm, reqs, out)
    return seen


def mixed_requests(seed: int, count: int = 12) -> list[Request]:
    """Greedy and seeded requests of mixed lengths: they finish out of order, so rows leave
    from the middle of the batch and new ones join into the freed slots."""
    rng = random.Random(seed)
    reqs = []
    for i in range(count):
        prompt = [rng.randrange(3, 97) for _ in range(rng.randrange(1, 10))]
        temp = 0.0 if i % 2 else 0.8
        p = SamplingParams(temperature=temp, seed=i, max_new_tokens=rng.randrange(1, 14),
                           ignore_eos=True, logprobs=1 if i % 3 == 0 else None)  # fmt: skip
        reqs.append(Request(prompt, p, tag=i))
    return reqs


def test_steps_run_only_the_live_rows(llm, monkeypatch):
    """Rows finishing anywhere are filled by moving the last live row down (its cache row,
    position, next token and sampler place), so each step forwards exactly the live rows and
    every sequence still equals its solo run."""
    seen = run_checking_rows(llm, mixed_requests(1), 4, 40, lambda n: n, monkeypatch)
    assert {1, 4} <= set(seen) and len(set(seen)) >= 3, seen  # the batch shrank, refilled


def test_batch_buckets():
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(3) == [1, 2, 3]
    assert batch_buckets(1) == [1]


def test_move_row_copies_plain_and_quantized_rows():
    from layercake.quant import QuantSpec

    for quant in (None, QuantSpec(bits=4, group_size=4)):
        c = KVCache.allocate([0, 3], batch=3, capacity=6, num_kv_heads=1, head_dim=4, quant=quant)
        parts = [p for t in c.tensors() for p in (t.parts() if quant else (t,))]
        for p in parts:
            p.copy_(torch.randint(0, 100, p.shape).to(p.dtype))
        c.valid[2, :4] = torch.tensor([False, True, True, True])
        c.length = 4
        before = [p.clone() for p in parts]
        move_row(c, 2, 0)
        for p, b in zip(parts, before):
            assert torch.equal(p[0, :, :4], b[2, :, :4]) and torch.equal(p[1:], b[1:])
        assert c.valid[0].tolist() == c.valid[2].tolist()


def test_greedy_groups_share_one_argmax(llm, monkeypatch):
    """Greedy streams admitted one per step (a sampler group each, as a server's requests
    arrive) take their decode tokens from one argmax a step, not a sampler call per group, and
    still equal their solo runs."""
    import layercake.engine as engine

    served, calls = [], []
    together, sample = engine.greedy_together, Sampler.sample

    def counted(logits, groups):  # noqa: ANN001, ANN202
        steps = together(logits, groups)
        served.append(len(steps))
        return steps

    monkeypatch.setattr(engine, "greedy_together", counted)
    monkeypatch.setattr(Sampler, "sample", lambda s, x: calls.append(len(x)) or sample(s, x))
    eng = Engine(llm.runner, llm.eos_token_ids, lambda ids: "", 4, 40)
    reqs = [Request([7 + i, 3, 11][: 1 + i % 3], SamplingParams(temperature=0.0,
            max_new_tokens=5 + 2 * i, ignore_eos=True), tag=i) for i in range(4)]  # fmt: skip
    out = {id(r): [] for r in reqs}
    for i, r in enumerate(reqs):
        eng.add(r)
        for req, ev in eng.step() if i < len(reqs) - 1 else eng.run():
            out[id(req)].append(ev)
    assert max(served) == 4 and calls.count(1) < sum(r.params.max_new_tokens for r in reqs) // 2
    assert_solo(llm, reqs, out)

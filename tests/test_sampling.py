"""The sampler: penalties, truncation sets, draws, seeds, logprobs, parameter checks."""

from __future__ import annotations

import math

import pytest
import torch

from layercake.errors import LayercakeError
from layercake.sampling import Sampler, SamplingParams
from layercake.sampling_ops import (
    apply_frequency_presence_penalties,
    apply_repetition_penalty,
    filter_logits,
    sample_from_logits,
    sample_from_probs,
)


def _kept(logits: torch.Tensor) -> list[set[int]]:
    return [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in logits]


def _filter(logits, top_k=0, top_p=1.0, min_p=0.0):
    B = logits.shape[0]
    return filter_logits(
        logits,
        torch.full((B,), top_k, dtype=torch.long),
        torch.full((B, 1), float(top_p)),
        torch.full((B, 1), float(min_p)),
    )


def _hf_filter(logits, top_k=0, top_p=1.0, min_p=0.0):
    from transformers import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    x = logits.clone()
    if top_k:
        x = TopKLogitsWarper(top_k)(None, x)
    if top_p < 1:
        x = TopPLogitsWarper(top_p)(None, x)
    if min_p:
        x = MinPLogitsWarper(min_p)(None, x)
    return x


# ---- truncation sets -----------------------------------------------------------------------


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.2, 0.1]])  # sorted: 1, 3, 0, 4, 2
    logits = probs.log()
    assert _kept(_filter(logits, top_p=0.69)) == [{1, 3}]  # 0.5 + 0.2 >= 0.69
    assert _kept(_filter(logits, top_p=0.72)) == [{1, 3, 0}]  # 0.7 < 0.72: needs the 0.15
    assert _kept(_filter(logits, top_p=0.4)) == [{1}]  # the top token alone suffices
    assert _kept(_filter(logits, top_p=1.0)) == [{0, 1, 2, 3, 4}]


def test_min_p_threshold_is_relative_to_top_probability():
    logits = torch.tensor([[0.1, 0.4, 0.2, 0.3]]).log()
    assert _kept(_filter(logits, min_p=0.3)) == [{1, 2, 3}]  # 0.1 < 0.3 * 0.4
    assert _kept(_filter(logits, min_p=0.6)) == [{1, 3}]  # 0.2 < 0.24 <= 0.3
    assert _kept(_filter(logits, min_p=1.0)) == [{1}]


def test_top_k_keeps_k_best_and_top_p_renormalizes_after_it():
    logits = torch.tensor([[0.3, 0.25, 0.2, 0.15, 0.1]]).log()
    assert _kept(_filter(logits, top_k=2)) == [{0, 1}]
    # after top-k=3 the masses are .4, .333, .267: p=0.7 needs all three (0.733 >= 0.7 at 2)
    assert _kept(_filter(logits, top_k=3, top_p=0.75)) == [{0, 1, 2}]
    assert _kept(_filter(logits, top_k=3, top_p=0.7)) == [{0, 1}]


@pytest.mark.parametrize(
    "kw",
    [
        dict(top_k=5),
        dict(top_k=100),
        dict(top_p=0.9),
        dict(top_p=0.3),
        dict(min_p=0.05),
        dict(top_k=200, top_p=0.8),
        dict(top_p=0.95, min_p=0.01),
        dict(top_k=40, min_p=0.2),
    ],
)
@pytest.mark.parametrize("scale", [0.5, 4.0])  # flat rows need far more than 64 candidates
def test_filter_matches_transformers_warpers(kw, scale):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 3000, generator=g) * scale
    ours, theirs = _filter(logits, **kw), _hf_filter(logits, **kw)
    assert _kept(ours) == _kept(theirs)
    assert torch.equal(ours[torch.isfinite(ours)], logits[torch.isfinite(ours)])


def test_top_p_after_top_k_with_ties_past_the_first_candidates():
    # 200 tied tokens: top-k keeps all ties (as HF does), so top-p must see all 200, not 64
    logits = torch.cat([torch.zeros(1, 200), torch.full((1, 300), -5.0)], dim=1)
    ours = _filter(logits, top_k=5, top_p=0.5)
    theirs = _hf_filter(logits, top_k=5, top_p=0.5)
    assert torch.isfinite(ours).sum() == torch.isfinite(theirs).sum() == 100


def test_filter_rows_with_different_params():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 500, generator=g) * 2
    out = filter_logits(
        logits,
        torch.tensor([3, 0, 0]),
        torch.tensor([[1.0], [0.5], [1.0]]),
        torch.tensor([[0.0], [0.0], [0.3]]),
    )
    assert _kept(out)[0] == _kept(_hf_filter(logits[:1], top_k=3))[0]
    assert _kept(out)[1] == _kept(_hf_filter(logits[1:2], top_p=0.5))[0]
    assert _kept(out)[2] == _kept(_hf_filter(logits[2:], min_p=0.3))[0]


# ---- penalties -----------------------------------------------------------------------------


def test_repetition_penalty_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1, 1]]), torch.tensor([[2.0]]))
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 50, generator=g)
    ids = torch.randint(0, 50, (2, 12), generator=g)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    ours = apply_repetition_penalty(logits.clone(), ids, torch.full((2, 1), 1.3))
    assert torch.equal(ours, expected)


def test_sampler_prompt_padding_is_not_a_seen_token():
    # rows of unequal prompt length: the short row's padding must not penalize any token
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0]] * 2)
    p = SamplingParams(temperature=0, repetition_penalty=10.0)
    step = Sampler([p, p], 4, prompts=[[2], [3, 3, 1]]).sample(logits.clone())
    assert step.token_ids == [0, 0]
    step = Sampler([p, p], 4, prompts=[[0], [3, 3, 1]]).sample(logits.clone())
    assert step.token_ids == [2, 0]  # 3.0 -> 0.3 only where 0 was seen


def test_frequency_and_presence_penalties_hand_computed():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    out_ids = torch.tensor([[2, 2, 3], [0, 0, 0]])
    out = apply_frequency_presence_penalties(
        logits, out_ids, torch.tensor([[0.5], [0.1]]), torch.tensor([[0.25], [-1.0]])
    )
    # row 0: token 2 twice -> 1 - 2*0.5 - 0.25; token 3 once -> 1 - 0.5 - 0.25
    # row 1: token 0 three times -> 1 - 3*0.1 + 1.0
    assert torch.allclose(out, torch.tensor([[1.0, 1.0, -0.25, 0.25], [1.7, 1.0, 1.0, 1.0]]))


def test_sampler_penalizes_prompt_and_output_tokens():
    base = torch.tensor([[0.0, 1.0, 0.9, 0.8, 1.9]])
    p = SamplingParams(temperature=0, repetition_penalty=2.0, max_new_tokens=4)
    s = Sampler([p], 5, prompts=[[4]])
    got = [s.sample(base.clone()).token_ids[0] for _ in range(4)]
    # token 4 (1.9 -> 0.95, seen in the prompt) loses to 1; once 1 is generated (1 -> 0.5),
    # 4 wins, and stays: as in HF, a repeated token is penalized once, not compounded
    assert got == [1, 4, 4, 4]
    q = SamplingParams(temperature=0, frequency_penalty=0.15, max_new_tokens=4)
    s = Sampler([q], 4, prompts=[[1]])
    base = torch.tensor([[0.0, 1.0, 0.9, 0.8]])
    got = [s.sample(base.clone()).token_ids[0] for _ in range(4)]
    # counts only the output: 1 (1.0), 2 (0.9 > 0.85), 1 (0.85 > 0.8), 3 (0.8 > 0.75 = 2 and 1)
    assert got == [1, 2, 1, 3]


# ---- draws ---------------------------------------------------------------------------------


def test_greedy_is_argmax_and_top_k_1_is_greedy():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(8, 1000, generator=g)
    greedy = Sampler([SamplingParams(temperature=0)] * 8, 1000).sample(logits.clone())
    assert greedy.token_ids == logits.argmax(-1).tolist()
    params = [SamplingParams(temperature=1.3, top_k=1, seed=i) for i in range(8)]
    assert Sampler(params, 1000).sample(logits.clone()).token_ids == greedy.token_ids


def test_greedy_takes_the_first_of_tied_maxima():
    """Greedy picks by ``max(-1)`` (faster than ``argmax``): ties go to the first index, as
    ``argmax``'s, in any row of a batch, at a vocabulary the size of a real model's."""
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(8, 49152, generator=g)
    for r, cols in enumerate([(5, 6), (40000, 3), (7, 49151, 12000), (0, 1), (9, 8, 10000)]):
        logits[r, list(cols)] = 100.0
    want = logits.argmax(-1).tolist()
    assert want[:5] == [5, 3, 7, 0, 8]
    greedy = Sampler([SamplingParams(temperature=0)] * 8, 49152).sample(logits.clone())
    assert greedy.token_ids == want


def test_draws_follow_the_distribution():
    probs = torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0])
    n = 40000
    u = torch.rand(n, 1, generator=torch.Generator().manual_seed(5))
    picks = sample_from_probs(probs.expand(n, 5).contiguous(), u)
    freq = torch.bincount(picks, minlength=5).float() / n
    assert freq[1] == 0 and freq[4] == 0
    assert torch.allclose(freq, probs, atol=0.01)
    # truncated draws renormalize over the kept set: top_k=2 keeps 0.5 and 0.3
    logits = probs.clamp_min(1e-9).log().expand(n, 5).contiguous()
    cut = (torch.full((n,), 2), torch.ones(n, 1), torch.zeros(n, 1))
    picks = sample_from_logits(logits, u, cut)
    freq = torch.bincount(picks, minlength=5).float() / n
    assert torch.allclose(freq, torch.tensor([0.625, 0, 0.375, 0, 0]), atol=0.01)


def test_uniform_at_top_edge_never_picks_zero_probability_tail():
    probs = torch.tensor([[0.25, 0.75, 0.0, 0.0]])
    assert sample_from_probs(probs, torch.tensor([[1.0 - 2**-24]])).item() == 1
    assert sample_from_probs(probs, torch.tensor([[0.0]])).item() == 0


def test_seeds_reproduce_and_rows_are_independent():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(20, 300, generator=g)

    def run(params, rows):
        s = Sampler(params, 300)
        return [s.sample(logits[rows].clone()).token_ids for _ in range(20)]

    a = run([SamplingParams(seed=11)], [0])
    assert a == run([SamplingParams(seed=11)], [0])
    assert a != run([SamplingParams(seed=12)], [0])
    # the same seeded row inside a batch with other params draws the same tokens
    mixed = [SamplingParams(temperature=0), SamplingParams(seed=11), SamplingParams(top_p=0.5)]
    batched = run(mixed, [5, 0, 7])
    assert [step[1] for step in batched] == [step[0] for step in a]
    assert [step[0] for step in batched] == [logits[5].argmax().item()] * 20


def test_logprobs_are_raw_model_distribution():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 100, generator=g)
    params = [
        SamplingParams(temperature=0.5, top_k=3, repetition_penalty=1.5, logprobs=4, seed=1),
        SamplingParams(temperature=0, logprobs=0),
        SamplingParams(),
    ]
    step = Sampler(params, 100, prompts=[[1, 2], [3], [4]]).sample(logits.clone())
    ref = torch.log_softmax(logits, -1)
    a, b, c = step.logprobs
    assert c is None
    assert a.token_id == step.token_ids[0]
    assert math.isclose(a.logprob, ref[0, a.token_id].item(), abs_tol=1e-6)
    top = ref[0].topk(4)
    assert list(a.top_logprobs) == top.indices.tolist()
    assert list(a.top_logprobs.values()) == pytest.approx(top.values.tolist(), abs=1e-6)
    assert b.top_logprobs == {} and b.token_id == logits[1].argmax().item()
    assert math.isclose(b.logprob, ref[1].max().item(), abs_tol=1e-6)


# ---- parameter checks ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=-0.1),
        dict(temperature=float("nan")),
        dict(top_k=-1),
        dict(top_k=2.5),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(min_p=-0.1),
        dict(min_p=1.1),
        dict(repetition_penalty=0.0),
        dict(frequency_penalty=2.5),
        dict(presence_penalty=-3),
        dict(seed=-1),
        dict(seed="1"),
        dict(stop="END"),
        dict(stop=[""]),
        dict(max_new_tokens=0),
        dict(logprobs=-1),
        dict(logprobs=21),
        dict(ignore_eos="yes"),
        dict(temperature="hot"),
    ],
)
def test_invalid_params_raise(kw):
    with pytest.raises(LayercakeError):
        SamplingParams(**kw).validate()
    with pytest.raises(LayercakeError):
        Sampler([SamplingParams(**kw)], 10)


def test_valid_params_pass():
    SamplingParams().validate()
    SamplingParams(
        temperature=0,
        top_k=5,
        top_p=0.5,
        min_p=1.0,
        repetition_penalty=1.2,
        seed=0,
        stop=["\n"],
        logprobs=20,
        frequency_penalty=-2,
        presence_penalty=2,
    ).validate()

"""Sampling is total: every value ``validate`` accepts, and logits with inf / NaN, give a token of
the vocabulary and finite logprobs; never an exception."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from layercake.sampling import GREEDY_BELOW, Sampler, SamplingParams
from layercake.sampling_ops import make_finite

V = 37
TEMPERATURES = [0.0, 1e-300, 1e-45, 1e-8, GREEDY_BELOW, 0.7, 1e5, 1e300]
TOP_P = [1e-300, 1e-9, 0.5, 1.0]
TOP_K = [0, 1, 3, V - 1, V, V + 1, 10**12]
MIN_P = [0.0, 1e-300, 0.5, 1.0]
REPETITION = [1e-300, 1e-6, 1.0, 1e6, 1e300]


def _logits(kind: str, rows: int = 3) -> torch.Tensor:
    x = torch.randn(rows, V, generator=torch.Generator().manual_seed(0)) * 4
    if kind == "inf":
        x[0::3, 3] = math.inf
        x[1::3, 5] = x[1::3, 9] = math.inf
    elif kind == "nan":
        x[0::3, 4] = math.nan
        x[1::3] = math.nan
    elif kind == "ninf":
        x[0::3] = -math.inf
        x[1::3, 2:] = -math.inf
    elif kind == "huge":
        x *= 1e37
    return x


def _check(s: Sampler, logits: torch.Tensor) -> None:
    for _ in range(2):
        step = s.sample(logits.clone())
        assert all(0 <= t < V for t in step.token_ids), step.token_ids
        for lp in step.logprobs:
            values = [lp.logprob, *lp.top_logprobs.values()]
            assert all(math.isfinite(v) for v in values), lp


@pytest.mark.parametrize("kind", ["normal", "inf", "nan", "ninf", "huge"])
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_extreme_values_always_give_a_token(kind, temperature):
    """Every combination in one batch (rows with different values share the sampler's paths)."""
    grid = itertools.product(TOP_P, TOP_K, MIN_P, REPETITION[::2])
    params = [SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                             repetition_penalty=rep, frequency_penalty=2.0,
                             presence_penalty=-2.0, seed=2**64 - 1, logprobs=20, max_new_tokens=3)
              for top_p, top_k, min_p, rep in grid]  # fmt: skip
    for p in params:
        p.validate()
    prompts = [[i % V, 2, 3][: 1 + i % 3] for i in range(len(params))]
    _check(Sampler(params, V, prompts), _logits(kind, len(params)))


@pytest.mark.parametrize("kind", ["normal", "inf", "nan", "huge"])
def test_extreme_penalties_give_a_token(kind):
    grid = itertools.product(REPETITION, [-2.0, 0.0, 2.0], [-2.0, 0.0, 2.0], [0.0, 1.0])
    params = [SamplingParams(temperature=t, repetition_penalty=rep, frequency_penalty=f,
                             presence_penalty=pr, max_new_tokens=4, logprobs=1)
              for rep, f, pr, t in grid]  # fmt: skip
    prompts = [[i % V, 1, 2] for i in range(len(params))]
    _check(Sampler(params, V, prompts), _logits(kind, len(params)))


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=1e-300),
        dict(temperature=GREEDY_BELOW / 2),
        dict(top_p=1e-300),
        dict(top_p=1e-9),
        dict(min_p=1.0),
        dict(top_k=1),
    ],  # fmt: skip
)
def test_vanishing_values_are_greedy(kw):
    """The limits: a vanishing temperature or nucleus, or min_p 1, keep only the best token."""
    x = _logits("normal")
    for seed in range(5):
        s = Sampler([SamplingParams(seed=seed, **kw)] * 3, V)
        assert s.sample(x.clone()).token_ids == x.argmax(-1).tolist()


def test_non_finite_logits():
    x = torch.tensor([[0.0, math.inf, 1.0, math.inf], [math.nan, 1.0, math.nan, 0.0],
                      [-math.inf] * 4, [math.nan] * 4])  # fmt: skip
    y = make_finite(x.clone())
    assert torch.isfinite(y.logsumexp(-1)).all()
    assert y[0].tolist() == [-math.inf, 0.0, -math.inf, 0.0]  # only the infinite ones, equally
    assert y[1].tolist() == [-math.inf, 1.0, -math.inf, 0.0]  # NaN is never chosen
    assert y[2].tolist() == y[3].tolist() == [0.0] * 4  # nothing left: uniform
    picks = {Sampler([SamplingParams(seed=s)], 4).sample(x[:1].clone()).token_ids[0]
             for s in range(40)}  # fmt: skip
    assert picks == {1, 3}
    greedy = Sampler([SamplingParams(temperature=0)] * 2, 4).sample(x[:2].clone())
    assert greedy.token_ids == [1, 1]
    finite = torch.randn(2, 9)
    assert make_finite(finite) is finite
    huge = torch.full((2, 9), 3e38)  # finite, though their sum is not: left as they are
    huge[1, 4] = -3e38
    assert torch.equal(make_finite(huge.clone()), huge)

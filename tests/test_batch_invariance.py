"""Greedy output does not depend on which other requests share a batch: prompts of different
lengths run together (the engine and ``generate``) give each one its solo tokens and logprobs, on
the fp32 path and on the packed path (block kernels, int8 activations per block of 32)."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests_helpers import bf16_llama

import layercake
from layercake.engine import Engine, Request
from layercake.sampling import SamplingParams

LENGTHS = [1, 3, 7, 7, 12, 20, 33, 5, 9, 16, 2, 40]
NEW = 12


@pytest.fixture(scope="module")
def lively(tmp_path_factory):
    """A random bf16 Llama whose every linear the block kernels take, with weights scaled so its
    next-token distributions are not one-hot (the helper's are: every logprob would be 0)."""
    path = bf16_llama(tmp_path_factory.mktemp("lively"), hidden=128, inter=256, vocab=256)
    for f in path.glob("*.safetensors"):
        t = load_file(f)
        for k, v in t.items():
            if "embed" in k or "proj" in k:
                t[k] = (v.float() * (0.15 if "embed" in k else 4.0)).to(v.dtype)
        save_file(t, f, metadata={"format": "pt"})
    return path


def _prompts(n: int) -> list[list[int]]:
    rng = random.Random(n)
    return [[rng.randrange(3, 256) for _ in range(k)] for k in LENGTHS[:n]]


def _engine(llm, prompts, slots):
    """(token, logprob) lists per prompt, run through one engine of ``slots`` rows."""
    eng = Engine(llm.runner, [], lambda ids: "", slots=slots, capacity=128)
    params = SamplingParams(temperature=0.0, max_new_tokens=NEW, ignore_eos=True, logprobs=0)
    reqs = [Request(p, params) for p in prompts]
    for r in reqs:
        eng.add(r)
    out = {id(r): [] for r in reqs}
    for req, ev in eng.run():
        out[id(req)].append((ev.token_id, ev.logprob.logprob))
    return [out[id(r)] for r in reqs]


def _generate(llm, prompts):
    res = llm.generate(prompts, max_new_tokens=NEW, ignore_eos=True, logprobs=0)
    return [[(lp.token_id, lp.logprob) for lp in r.logprobs] for r in res]


def _check(together, alone, exact: bool):
    assert len(together) == len(alone)
    for t, a in zip(together, alone):
        assert [x[0] for x in t] == [x[0] for x in a]  # greedy tokens
        assert t[0][1] == a[0][1]  # the prompt's own logits: bit for bit on every path
        if exact:
            assert t == a
        else:  # fp32 decode steps: PyTorch's fp32 matmul rounds by its row count
            assert [x[1] for x in t] == pytest.approx([x[1] for x in a], abs=1e-4)


@pytest.mark.parametrize("packed", [False, True])
def test_batch_equals_solo(lively, packed):
    llm = layercake.load(lively, packed=packed)
    prompts = _prompts(8)
    alone = [_engine(llm, [p], 1)[0] for p in prompts]
    assert alone == [_generate(llm, [p])[0] for p in prompts]
    assert len({x[1] for a in alone for x in a}) > 10  # logprobs that can show a difference
    _check(_engine(llm, prompts, 8), alone, exact=packed)  # admitted together
    _check(_engine(llm, prompts, 3), alone, exact=packed)  # joining and leaving
    _check(_generate(llm, prompts), alone, exact=packed)


def test_packed_batch_of_more_than_8_equals_solo(lively):
    """One forward for every batch size (no second model for small batches): a step of 12 rows
    rounds each row as a step of one does."""
    llm = layercake.load(lively, packed=True)
    prompts = _prompts(12)
    alone = [_engine(llm, [p], 1)[0] for p in prompts]
    _check(_engine(llm, prompts, 12), alone, exact=True)


def test_fp32_rows_do_not_leak(lively):
    """fp32: the prompt's logits are bit for bit its solo ones, whatever the other lengths."""
    llm = layercake.load(lively)
    prompts = _prompts(12)
    solo = torch.stack([llm.logits([p])[0, -1] for p in prompts])
    first = [r.logprobs[0].logprob for r in llm.generate(prompts, max_new_tokens=1, logprobs=0)]
    assert (
        first == torch.log_softmax(solo, -1).gather(1, solo.argmax(-1, keepdim=True))[:, 0].tolist()
    )

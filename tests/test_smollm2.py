"""The real embedded model: SmolLM2-135M-Instruct Q4_1 GGUF, against transformers loading the same
file (same dequantized weights): tokenizer ids, logits, greedy continuation, chat."""

from __future__ import annotations

import pytest
import torch

import layercake
from layercake.llm import embedded_model_path


@pytest.fixture(scope="module")
def both():
    import transformers

    path = embedded_model_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return layercake.load(exact=True), hf, tok  # fp32 throughout, as transformers


PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a land"]


def test_fast_default_keeps_the_gguf_blocks(both):
    """Without options the Q4_1/Q8_0 weights run as blocks on our kernel (int8 activations, as
    llama.cpp): logits within a few percent of the exact path's, the same top token."""
    from layercake.ops.linear import forms

    exact, _, tok = both
    fast = layercake.load()
    assert forms(fast.runner.slices[0]) == {"blocks": 30 * 4 + 1}  # q/k/v, gate/up fused
    assert "blocks" in fast.runner.describe()
    ids = tok.encode(PROMPTS[0])
    a, b = fast.logits([ids])[0], exact.logits([ids])[0]
    assert ((a - b).norm() / b.norm()).item() < 0.05
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.8


def test_tokenizer_ids(both):
    llm, _, tok = both
    for p in PROMPTS:
        assert llm.tokenizer.encode(p) == tok.encode(p)


def test_logits_prefill_and_cached_decode(both):
    llm, hf, tok = both
    ids = tok.encode(PROMPTS[0] + " Paris, and the capital of Germany is")
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    full = llm.logits([ids])[0]
    assert (full - ref).abs().max().item() < 1e-3  # |logits| ~ 30: fp32 rounding, not error
    # cached decode: prefill all but 4 tokens, then one at a time through the cache
    r = llm.runner
    cache = r.new_cache(1, len(ids))
    T = len(ids) - 4
    outs = [r.forward(torch.tensor([ids[:T]]), torch.arange(T)[None], cache)[0]]
    for t in range(T, len(ids)):
        outs.append(r.forward(torch.tensor([[ids[t]]]), torch.tensor([[t]]), cache)[0])
    assert (torch.cat(outs) - ref).abs().max().item() < 1e-3


def test_greedy_continuation_batch(both):
    llm, hf, tok = both
    outs = llm.generate(PROMPTS, max_new_tokens=20, ignore_eos=True)
    for p, out in zip(PROMPTS, outs):
        ids = torch.tensor([tok.encode(p)])
        with torch.no_grad():
            ref = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=20,
                min_new_tokens=20,
                do_sample=False,
            )
        assert out.token_ids == ref[0, ids.shape[1] :].tolist(), p


def test_chat_answer(both):
    llm, _, tok = both
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    assert llm.tokenizer.apply_chat_template(msgs) == tok.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True
    )
    out = llm.generate(llm.chat_prompt(msgs), max_new_tokens=30)[0]
    assert "Paris" in out.text and out.finish_reason == "stop"


def test_score_prefers_the_right_answer(both):
    llm, _, _ = both
    s = llm.score("The capital of France is", [" Paris", " a banana"])
    assert s[0].logprob_sum > s[1].logprob_sum
    assert len(s[1].token_logprobs) == len(
        llm.tokenizer.encode(" a banana", add_special_tokens=False)
    )

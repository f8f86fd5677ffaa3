"""The generation loop and scoring, against small fake runners that honor the Runner contract
(and once against the real LocalRunner, with transformers as the oracle)."""

from __future__ import annotations

import math

import pytest
import torch

from layercake.errors import LayercakeError
from layercake.generate import GenerationStats, generate, generate_stream, score
from layercake.sampling import SamplingParams


class FakeCache:
    """Remembers each slot's token, position and validity; ``select`` drops rows."""

    def __init__(self, batch: int, capacity: int) -> None:
        self.tokens = torch.zeros(batch, capacity, dtype=torch.long)
        self.positions = torch.zeros(batch, capacity, dtype=torch.long)
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool)
        self.length = 0
        self.selects = 0

    def select(self, rows: torch.Tensor) -> None:
        self.tokens, self.positions, self.valid = (
            t.index_select(0, rows) for t in (self.tokens, self.positions, self.valid)
        )
        self.selects += 1


class NoSelectCache(FakeCache):
    select = None  # a runner whose cache cannot drop rows: finished rows stay, masked


class BagRunner:
    """A toy LM: the logits of a slot are a fixed random function of the valid tokens its row
    has seen so far and of their positions, so padding or a wrong position changes them."""

    def __init__(self, vocab_size=40, max_context=64, seed=0, cache_cls=FakeCache, scale=3.0):
        g = torch.Generator().manual_seed(seed)
        d = 16
        self.vocab_size, self.max_context = vocab_size, max_context
        self.device = torch.device("cpu")
        self.cache_cls = cache_cls
        self.emb = torch.randn(vocab_size, d, generator=g, dtype=torch.float64)
        self.pos_key = torch.randn(max_context, d, generator=g, dtype=torch.float64) * 0.3
        self.pos_query = torch.randn(max_context, d, generator=g, dtype=torch.float64)
        self.out = torch.randn(d, vocab_size, generator=g, dtype=torch.float64) * scale
        self.calls: list[tuple[int, int]] = []

    def new_cache(self, batch: int, capacity: int) -> FakeCache:
        return self.cache_cls(batch, capacity)

    def forward(self, tokens, positions, cache, token_mask=None, last_only=False):
        B, T = tokens.shape
        assert positions.shape == (B, T) and cache.valid.shape[0] == B
        assert 0 <= positions.min() and positions.max() < self.max_context
        assert 0 <= tokens.min() and tokens.max() < self.vocab_size
        start, end = cache.length, cache.length + T
        assert end <= cache.valid.shape[1], "cache overflow"
        self.calls.append((B, T))
        mask = torch.ones(B, T, dtype=torch.bool) if token_mask is None else token_mask
        cache.tokens[:, start:end], cache.positions[:, start:end] = tokens, positions
        cache.valid[:, start:end] = mask
        cache.length = end
        keys = self.emb[cache.tokens[:, :end]] + self.pos_key[cache.positions[:, :end]]
        q = torch.arange(start, end)[:, None]
        see = (torch.arange(end)[None, :] <= q)[None] & cache.valid[:, None, :end]  # (B, T, end)
        h = see.double() @ keys / see.sum(-1, keepdim=True).clamp(min=1)
        logits = torch.tanh(h + self.pos_query[positions]) @ self.out  # (B, T, V)
        return (logits[:, -1:] if last_only else logits).float()


class ScriptRunner(BagRunner):
    """Greedy decoding reproduces a script: the token after position p is script[p + 1], where
    the script is chosen by the row's first token."""

    def __init__(self, scripts: dict[int, list[int]], vocab_size: int, **kw):
        super().__init__(vocab_size=vocab_size, **kw)
        self.scripts = scripts

    def forward(self, tokens, positions, cache, token_mask=None, last_only=False):
        super().forward(tokens, positions, cache, token_mask, last_only)
        first = [int(row[v][0]) for row, v in zip(cache.tokens, cache.valid)]
        logits = torch.zeros(*tokens.shape, self.vocab_size)
        for b in range(tokens.shape[0]):
            script = self.scripts[first[b]]
            for t in range(tokens.shape[1]):
                nxt = int(positions[b, t]) + 1
                logits[b, t, script[nxt] if nxt < len(script) else 0] = 10.0
        return logits[:, -1:] if last_only else logits


WORDS = ["<eos>", "<s>", "Hello", " ", "wor", "ld", "!", "ST", "OP", "xSTOPy", "ay", "END", "S"]


def decode_words(ids: list[int]) -> str:
    return "".join(WORDS[i] for i in ids)


def _script(*words: str) -> list[int]:
    return [WORDS.index(w) for w in words]


def _stream(runner, prompts, params, eos=(0,), decode=decode_words):
    events = list(generate_stream(runner, prompts, params, list(eos), decode))
    return {i: [e for e in events if e.index == i] for i in range(len(prompts))}


GREEDY = SamplingParams(temperature=0, max_new_tokens=20)


# ---- stop strings and EOS ------------------------------------------------------------------


def test_stop_string_truncates_and_is_never_streamed():
    words = ("<s>", "Hello", " ", "wor", "ld", "!", " ", "ST", "OP", " ", "Hello")
    runner = ScriptRunner({1: _script(*words)}, len(WORDS))
    params = SamplingParams(temperature=0, max_new_tokens=20, stop=["STOP"])
    events = _stream(runner, [_script("<s>")], [params])[0]
    streamed = [e.text for e in events]
    assert streamed == ["Hello", " ", "wor", "ld", "!", " ", "", ""]  # "ST" held, then cut
    assert events[-1].finish_reason == "stop" and events[-1].token_id == WORDS.index("OP")
    (res,) = generate(runner, [_script("<s>")], [params], [0], decode_words)
    assert res.text == "Hello world! " and res.finish_reason == "stop"
    assert res.token_ids == _script(*words[1:9])  # the tokens, unlike the text, are kept


def test_partial_stop_match_is_held_back_then_released():
    words = ("<s>", "Hello", "ST", "ay", "!")
    runner = ScriptRunner({1: _script(*words)}, len(WORDS))
    params = SamplingParams(temperature=0, max_new_tokens=4, stop=["STOP", "END"])
    events = _stream(runner, [[1]], [params])[0]
    assert [e.text for e in events] == ["Hello", "", "STay", "!"]
    assert events[-1].finish_reason == "length"


def test_stop_inside_a_token_and_earliest_stop_wins():
    runner = ScriptRunner({1: _script("<s>", "Hello", "xSTOPy", "END")}, len(WORDS))
    params = SamplingParams(temperature=0, max_new_tokens=5, stop=["y", "STOP"])
    (res,) = generate(runner, [[1]], [params], [0], decode_words)
    assert res.text == "Hellox" and res.finish_reason == "stop"


def test_held_back_text_is_flushed_at_length_and_eos():
    scripts = {1: _script("<s>", "Hello", "ST"), 2: _script("Hello", "Hello", "S", "<eos>")}
    runner = ScriptRunner(scripts, len(WORDS))
    p1 = SamplingParams(temperature=0, max_new_tokens=2, stop=["STOP"])
    p2 = SamplingParams(temperature=0, max_new_tokens=9, stop=["STOP"])
    ev = _stream(runner, [[1], [2]], [p1, p2])
    assert [e.text for e in ev[0]] == ["Hello", "ST"] and ev[0][-1].finish_reason == "length"
    assert [e.text for e in ev[1]] == ["Hello", "", "S"] and ev[1][-1].finish_reason == "stop"


def test_eos_ends_a_row_unless_ignored():
    runner = ScriptRunner({1: _script("<s>", "Hello", "<eos>", "wor", "ld", "<eos>")}, len(WORDS))
    (res,) = generate(runner, [[1]], GREEDY, [0], decode_words)
    assert res.token_ids == [2, 0] and res.text == "Hello" and res.finish_reason == "stop"
    assert res.completion_tokens == 2 and res.prompt_tokens == 1
    keep_going = SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True)
    (res,) = generate(runner, [[1]], keep_going, [0], decode_words)
    assert res.token_ids == [2, 0, 4, 5] and res.finish_reason == "length"
    assert res.text == "Hello<eos>world"  # an ignored EOS is an ordinary token
    (res,) = generate(runner, [[1]], GREEDY, [], decode_words)  # no EOS id: runs to length
    assert len(res.token_ids) == 20 and res.finish_reason == "length"


def test_multibyte_characters_are_never_streamed_half_done():
    text = "héllo ✓ 日本"
    script = [0] + list(text.encode())
    runner = ScriptRunner({0: script}, 256, max_context=64)
    params = SamplingParams(temperature=0, max_new_tokens=len(script) - 1)

    def decode(ids):
        return bytes(ids).decode("utf-8", errors="replace")

    events = list(generate_stream(runner, [[0]], [params], [], decode))
    assert "".join(e.text for e in events) == text
    assert not any("\ufffd" in e.text for e in events)


# ---- batching ------------------------------------------------------------------------------


@pytest.mark.parametrize("cache_cls", [FakeCache, NoSelectCache])
def test_mixed_prompt_lengths_match_running_alone(cache_cls):
    prompts = [[3, 7, 1], [5], [9, 9, 2, 4, 8, 1, 30], [11, 12, 13, 14, 15]]
    params = [
        SamplingParams(temperature=0, max_new_tokens=6),
        SamplingParams(temperature=0.8, seed=3, max_new_tokens=12, logprobs=2),
        SamplingParams(temperature=1.2, top_p=0.9, seed=4, max_new_tokens=3),
        SamplingParams(
            top_k=5,
            repetition_penalty=1.3,
            presence_penalty=0.5,
            seed=5,
            max_new_tokens=9,
            stop=["IX"],
        ),
    ]
    vocab = [chr(ord("A") + i) for i in range(40)]
    decode = lambda ids: "".join(vocab[i] for i in ids)  # noqa: E731
    runner = BagRunner(cache_cls=cache_cls)
    eos = [30]
    batched = generate(runner, prompts, params, eos, decode)
    # rows end by EOS (0, 1), length (2) and a stop string (3) at different steps
    assert [r.finish_reason for r in batched] == ["stop", "stop", "length", "stop"]
    assert [len(r.token_ids) for r in batched] == [3, 5, 3, 5]
    for prompt, p, got in zip(prompts, params, batched):
        (alone,) = generate(BagRunner(), [prompt], [p], eos, decode)
        assert got.token_ids == alone.token_ids and got.text == alone.text
        assert got.finish_reason == alone.finish_reason
        if p.logprobs is not None:
            assert [e.token_id for e in got.logprobs] == [e.token_id for e in alone.logprobs]
            assert [e.logprob for e in got.logprobs] == pytest.approx(
                [e.logprob for e in alone.logprobs], abs=1e-5
            )
    assert len({tuple(r.token_ids) for r in batched}) == 4  # rows did not copy each other


def test_finished_rows_are_dropped_when_the_cache_allows():
    prompts = [[1, 2], [3, 4, 5], [6], [7, 8]]
    params = [SamplingParams(temperature=0, max_new_tokens=n) for n in (2, 10, 2, 2)]
    runner = BagRunner()
    generate(runner, prompts, params, [], str)
    assert runner.calls[0] == (4, 3)  # prefill: every row, padded to 3
    assert runner.calls[-1] == (1, 1)  # the long row alone at the end
    assert len(runner.calls) == 10  # prefill + 9 decode steps: no step after the last token


def test_finished_rows_kept_in_the_batch_stay_inside_the_context():
    # without cache.select a finished row rides along; its position must not keep growing
    runner = BagRunner(cache_cls=NoSelectCache)  # max_context 64; the runner checks positions
    prompts = [[1] * 60, [2]]
    params = [SamplingParams(temperature=0, max_new_tokens=n) for n in (2, 40)]
    results = generate(runner, prompts, params, [], str)
    assert [len(r.token_ids) for r in results] == [2, 40]
    assert all(b == 2 for b, _ in runner.calls)


def test_seed_reproduces_and_different_seeds_differ():
    runner = BagRunner(scale=1.0)
    prompts = [[1, 2, 3]]

    def run(seed: int) -> list[int]:
        params = SamplingParams(seed=seed, max_new_tokens=15)
        return generate(runner, prompts, params, [], str)[0].token_ids

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_top_k_1_equals_greedy_and_greedy_is_argmax():
    runner = BagRunner()
    prompts = [[4, 5, 6], [7]]
    greedy = generate(runner, prompts, GREEDY, [], str)
    top1 = generate(runner, prompts, SamplingParams(top_k=1, seed=1, max_new_tokens=20), [], str)
    assert [r.token_ids for r in greedy] == [r.token_ids for r in top1]
    for prompt, r in zip(prompts, greedy):  # replay each step by hand
        seq = list(prompt)
        for tok in r.token_ids:
            cache = runner.new_cache(1, len(seq))
            logits = runner.forward(torch.tensor([seq]), torch.arange(len(seq))[None], cache)
            assert tok == logits[0, -1].argmax().item()
            seq.append(tok)


def test_logprobs_equal_log_softmax_of_the_model():
    runner = BagRunner()
    prompt = [3, 1, 4, 1, 5]
    p = SamplingParams(
        temperature=0.7, top_p=0.8, repetition_penalty=1.2, seed=2, max_new_tokens=6, logprobs=3
    )
    (r,) = generate(runner, [prompt], [p], [], str)
    assert len(r.logprobs) == len(r.token_ids) == 6
    seq = list(prompt)
    for tok, entry in zip(r.token_ids, r.logprobs):
        cache = runner.new_cache(1, len(seq))
        logits = runner.forward(torch.tensor([seq]), torch.arange(len(seq))[None], cache)
        ref = torch.log_softmax(logits[0, -1], -1)
        assert entry.token_id == tok
        assert math.isclose(entry.logprob, ref[tok].item(), abs_tol=1e-5)
        assert list(entry.top_logprobs) == ref.topk(3).indices.tolist()
        seq.append(tok)


def test_stats_count_tokens_and_time():
    stats = GenerationStats()
    prompts = [[1, 2, 3], [4]]
    params = [SamplingParams(temperature=0, max_new_tokens=n) for n in (5, 2)]
    res = generate(BagRunner(), prompts, params, [], str, stats=stats)
    assert res[0].stats is stats
    assert stats.batch_size == 2 and stats.prompt_tokens == 4
    assert stats.generated_tokens == 7 and stats.decode_tokens == 5 and stats.decode_steps == 4
    assert stats.prefill_s > 0 and stats.decode_s > 0
    assert stats.throughput == pytest.approx(7 / (stats.prefill_s + stats.decode_s))


# ---- input checks --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompts, params, needle",
    [
        ([[1] * 65], GREEDY, "prompt 0 has 65 tokens"),
        ([[1], [1] * 50], SamplingParams(max_new_tokens=20), "prompt 1 has 50 tokens"),
        ([[1], []], GREEDY, "prompt 1 is empty"),
        ([[1, 40]], GREEDY, "token id 40"),
        ([[1], [2]], [GREEDY], "2 prompts but 1"),
        ([[1]], SamplingParams(top_p=0), "top_p"),
    ],
)
def test_bad_input_raises_before_any_work(prompts, params, needle):
    runner = BagRunner()
    with pytest.raises(LayercakeError, match=needle):
        generate_stream(runner, prompts, params, [], str)  # raises at call, not on iteration
    assert runner.calls == []


# ---- scoring -------------------------------------------------------------------------------


def test_score_equals_manual_sums():
    runner = BagRunner()
    prompt = [5, 6, 7, 8]
    conts = [[1], [2, 3, 4], [9, 9], [3, 1, 4, 1, 5]]
    results = score(runner, prompt, conts)
    for c, r in zip(conts, results):
        seq = prompt + c
        cache = runner.new_cache(1, len(seq))
        logits = runner.forward(torch.tensor([seq]), torch.arange(len(seq))[None], cache)
        lp = torch.log_softmax(logits[0].double(), -1)
        manual = [lp[len(prompt) - 1 + t, tok].item() for t, tok in enumerate(c)]
        assert r.token_logprobs == pytest.approx(manual, abs=1e-5)
        assert r.logprob_sum == pytest.approx(sum(manual), abs=1e-4)
        assert r.logprob_mean == pytest.approx(sum(manual) / len(c), abs=1e-4)
        greedy = all(logits[0, len(prompt) - 1 + t].argmax() == tok for t, tok in enumerate(c))
        assert r.is_greedy == greedy
    singles = score(runner, prompt, [[1], [3]])  # one-token continuations: the prompt pass only
    assert singles[0].logprob_sum == pytest.approx(results[0].logprob_sum, abs=1e-5)
    assert singles[1].token_logprobs[0] == pytest.approx(results[3].token_logprobs[0], abs=1e-5)
    with pytest.raises(LayercakeError, match="continuation 1 is empty"):
        score(runner, prompt, [[1], []])
    with pytest.raises(LayercakeError, match="prompt is empty"):
        score(runner, [], [[1]])
    with pytest.raises(LayercakeError, match="context"):
        score(runner, [1] * 60, [[1] * 5])


# ---- the real runner -----------------------------------------------------------------------


def test_local_runner_matches_transformers(tiny_llama):
    from conftest import hf_model

    from layercake.checkpoint import open_checkpoint
    from layercake.config import load_config
    from layercake.models.build import build_slice
    from layercake.runner import LocalRunner

    ckpt = open_checkpoint(tiny_llama)
    runner = LocalRunner([build_slice(ckpt, "f")], load_config(ckpt.config_dict()))
    model = hf_model(tiny_llama)
    prompts = [[1, 5, 7, 9, 11], [2, 3], [4, 8, 15, 16, 23, 42, 50]]
    results = generate(runner, prompts, SamplingParams(temperature=0, max_new_tokens=8), [], str)
    for prompt, r in zip(prompts, results):
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=0
        )
        assert r.token_ids == out[0, len(prompt) :].tolist()
    conts = [[3], [10, 20, 30], [7, 7]]
    for c, r in zip(conts, score(runner, prompts[0], conts)):
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([prompts[0] + c])).logits[0], -1)
        manual = sum(lp[len(prompts[0]) - 1 + t, tok].item() for t, tok in enumerate(c))
        assert r.logprob_sum == pytest.approx(manual, abs=1e-4)

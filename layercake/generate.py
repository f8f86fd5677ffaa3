"""Generation over a Runner: batched prefill (rows of one length together, unpadded; see
``prefill``), then one-token decode steps, streamed.

Also ``score``: log P(continuation | prompt) for multiple-choice evaluation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from layercake.errors import LayercakeError
from layercake.kv_cache import KVCache
from layercake.prefill import left_pad, prefill
from layercake.sampling import Sampler, SamplingParams, TokenLogprob

if TYPE_CHECKING:
    from layercake.runner import Runner


@dataclass
class StepEvent:
    """One generated token of one request, as it happens."""

    index: int  # which prompt of the request list
    token_id: int
    text: str  # new text to show; never any part of a stop string ("" while held back)
    logprob: TokenLogprob | None
    finish_reason: str | None = None  # set on the row's last token: "stop" or "length"


@dataclass
class GenerationStats:
    """Wall-clock counters of one batch (FlexGen's throughput = generated / (prefill + decode)).

    Only the engine's own work is timed, not time spent by the consumer of the stream."""

    batch_size: int = 0
    prompt_tokens: int = 0  # real tokens, padding not counted
    generated_tokens: int = 0
    prefill_s: float = 0.0  # prefill forward + first token of every row (time to first token)
    decode_s: float = 0.0  # every later step
    decode_steps: int = 0
    decode_tokens: int = 0  # tokens produced by the decode steps

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def throughput(self) -> float:
        """Generated tokens per second of prefill + decode."""
        return self.generated_tokens / self.total_s if self.total_s > 0 else 0.0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class GenerationResult:
    text: str  # generated text, cut before a stop string
    token_ids: list[int]  # generated tokens only (an EOS that ended the row included)
    logprobs: list[TokenLogprob] | None  # per generated token, when asked for
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    stats: GenerationStats = field(repr=False)  # shared by the whole batch


@dataclass
class ScoreResult:
    logprob_sum: float  # log P(continuation | prompt)
    logprob_mean: float  # per continuation token
    token_logprobs: list[float]
    is_greedy: bool  # every continuation token was the argmax (lm-eval-harness' "acc" check)


class _Detokenizer:
    """Incremental detokenization (vLLM's prefix/read offsets): decode a short window per step,
    not the whole text, and hold back output while it ends in an incomplete UTF-8 character."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = 0  # window start: earlier context keeps word-boundary spaces right
        self.read = 0  # tokens already turned into text

    def push(self, token: int | None, final: bool = False) -> str:
        if token is not None:
            self.ids.append(token)
        if self.read == len(self.ids):
            return ""
        before = self.decode(self.ids[self.prefix : self.read])
        after = self.decode(self.ids[self.prefix :])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""


class Row:
    """Text state of one request: stop strings, streamed prefix, finish reason."""

    def __init__(
        self, index: int, params: SamplingParams, eos: set[int], decode: Callable[[list[int]], str]
    ) -> None:
        self.index, self.params, self.eos = index, params, eos
        self.detok = _Detokenizer(decode)
        self.text = ""
        self.sent = 0  # characters of ``text`` already streamed
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.finish_reason: str | None = None
        self.max_stop = max((len(s) for s in params.stop), default=0)

    def push(self, token: int, logprob: TokenLogprob | None) -> StepEvent:
        self.token_ids.append(token)
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)
        if token in self.eos and not self.params.ignore_eos:
            new, self.finish_reason = self.detok.push(None, final=True), "stop"
        else:
            done = len(self.token_ids) >= self.params.max_new_tokens
            new = self.detok.push(token, final=done)
            self.finish_reason = "length" if done else None
        start = max(0, len(self.text) - self.max_stop + 1)
        self.text += new
        if new and self.params.stop:
            hits = [j for j in (self.text.find(s, start) for s in self.params.stop) if j >= 0]
            if hits:
                self.text, self.finish_reason = self.text[: min(hits)], "stop"
        end = len(self.text) if self.finish_reason else len(self.text) - self._partial_stop()
        delta = self.text[self.sent : max(self.sent, end)]
        self.sent += len(delta)
        return StepEvent(self.index, token, delta, logprob, self.finish_reason)

    def _partial_stop(self) -> int:
        """Length of the longest end of ``text`` that could begin a stop string: held back."""
        for n in range(min(self.max_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.params.stop):
                return n
        return 0


def _check_tokens(what: str, ids: list[int], vocab_size: int) -> None:
    if not ids:
        raise LayercakeError(f"{what} is empty: give at least one token (e.g. the BOS token)")
    lo, hi = min(ids), max(ids)
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise LayercakeError(f"{what} has token id {bad}, outside the vocabulary [0, {vocab_size})")


def check_prompt(
    what: str,
    prompt: list[int],
    params: SamplingParams,
    vocab_size: int,
    limit: int,
    limit_name: str = "the model's context",
) -> None:
    """Raise LayercakeError when ``params`` are invalid or the prompt and its generation do not
    fit in ``limit`` tokens."""
    params.validate()
    _check_tokens(what, prompt, vocab_size)
    n = len(prompt)
    if n > limit:
        raise LayercakeError(f"{what} has {n} tokens, more than {limit_name} of {limit}")
    if n + params.max_new_tokens > limit:
        raise LayercakeError(
            f"{what} has {n} tokens and asks for max_new_tokens={params.max_new_tokens}: "
            f"{n + params.max_new_tokens} is beyond {limit_name} of {limit}; "
            f"use max_new_tokens <= {limit - n}"
        )


def generate_stream(
    runner: Runner,
    prompts: list[list[int]],
    params: list[SamplingParams] | SamplingParams,
    eos_token_ids: list[int],
    decode: Callable[[list[int]], str],
    stats: GenerationStats | None = None,
) -> Iterator[StepEvent]:
    """Generate for a batch of tokenized prompts, yielding one ``StepEvent`` per row per step.

    ``params`` is one per prompt (or one for all). Inputs are checked here, before the first
    event is asked for. ``stats``, if given, is filled with the batch's counters."""
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    if len(params) != len(prompts):
        raise LayercakeError(f"{len(prompts)} prompts but {len(params)} sampling params")
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        check_prompt(f"prompt {i}", prompt, p, runner.vocab_size, runner.max_context)
    stats = stats if stats is not None else GenerationStats()
    return _stream(runner, prompts, params, set(eos_token_ids), decode, stats)


def _stream(
    runner: Runner,
    prompts: list[list[int]],
    params: list[SamplingParams],
    eos: set[int],
    decode: Callable[[list[int]], str],
    stats: GenerationStats,
) -> Iterator[StepEvent]:
    if not prompts:
        return
    B, dev = len(prompts), runner.device
    stats.batch_size, stats.prompt_tokens = B, sum(len(p) for p in prompts)
    rows = [Row(i, p, eos, decode) for i, p in enumerate(params)]
    live = list(range(B))  # request index of each batch row still in the cache

    t0 = time.perf_counter()
    with torch.inference_mode():
        L = max(len(p) for p in prompts)
        cache = runner.new_cache(B, L + max(p.max_new_tokens for p in params))
        sampler = Sampler(params, runner.vocab_size, prompts, dev)
        if hasattr(runner, "use_sampler"):  # a pipeline: greedy rows come back as ids
            runner.use_sampler(sampler)
        if isinstance(cache, KVCache):
            cache.length = L  # every row's prompt ends here
            logits = prefill(runner, cache, prompts, list(range(B)))
        else:  # a cache held elsewhere (a pipeline's nodes): one left-padded forward
            tokens, positions, mask = left_pad(prompts, dev)
            logits = runner.forward(tokens, positions, cache, token_mask=mask, last_only=True)
            logits = logits[:, -1]
        step = sampler.sample(logits)
        del logits  # not held through the next step's forward, which makes the next (B, V)
        pos = torch.tensor([[len(p)] for p in prompts], device=dev)  # (B, 1) next position
    events = [rows[r].push(t, lp) for r, t, lp in zip(live, step.token_ids, step.logprobs)]
    stats.prefill_s += time.perf_counter() - t0
    stats.generated_tokens += len(events)
    yield from events

    can_drop = callable(getattr(cache, "select", None))
    while True:
        t0 = time.perf_counter()
        done = [rows[r].finish_reason is not None for r in live]
        if all(done):
            return
        with torch.inference_mode():
            next_tokens = step.tokens.view(-1, 1)
            if can_drop and 4 * sum(done) >= len(live):  # amortize the cache copy
                keep = [b for b, d in enumerate(done) if not d]
                keep_t = torch.tensor(keep, device=dev)
                cache.select(keep_t)
                sampler.select(keep)
                next_tokens, pos = next_tokens[keep_t], pos[keep_t]
                live, done = [live[b] for b in keep], [False] * len(keep)
            # finished rows still in the batch: padding at a frozen position, output ignored
            active = None if not any(done) else torch.tensor(done, device=dev).logical_not()
            mask = None if active is None else active.view(-1, 1)
            logits = runner.forward(next_tokens, pos, cache, token_mask=mask, last_only=True)
            step = sampler.sample(logits[:, -1])
            del logits
            pos += 1 if active is None else mask
        events = [
            rows[r].push(t, lp)
            for r, t, lp, d in zip(live, step.token_ids, step.logprobs, done)
            if not d
        ]
        stats.decode_s += time.perf_counter() - t0
        stats.decode_steps += 1
        stats.decode_tokens += len(events)
        stats.generated_tokens += len(events)
        yield from events


def generate(
    runner: Runner,
    prompts: list[list[int]],
    params: list[SamplingParams] | SamplingParams,
    eos_token_ids: list[int],
    decode: Callable[[list[int]], str],
    stats: GenerationStats | None = None,
) -> list[GenerationResult]:
    """Run ``generate_stream`` to the end; one result per prompt, in order."""
    stats = stats if stats is not None else GenerationStats()
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    texts = [""] * len(prompts)
    ids: list[list[int]] = [[] for _ in prompts]
    logprobs: list[list[TokenLogprob] | None] = [
        [] if p.logprobs is not None else None for p in params
    ]
    reasons = [""] * len(prompts)
    for ev in generate_stream(runner, prompts, params, eos_token_ids, decode, stats):
        texts[ev.index] += ev.text
        ids[ev.index].append(ev.token_id)
        if logprobs[ev.index] is not None and ev.logprob is not None:
            logprobs[ev.index].append(ev.logprob)
        if ev.finish_reason:
            reasons[ev.index] = ev.finish_reason
    return [
        GenerationResult(t, i, lp, r, len(p), len(i), stats)
        for t, i, lp, r, p in zip(texts, ids, logprobs, reasons, prompts)
    ]


def score(runner: Runner, prompt: list[int], continuations: list[list[int]]) -> list[ScoreResult]:
    """log P(continuation | prompt) for each continuation, in one batch.

    Two forwards instead of one over left-padded prompt+continuation rows: the prompt (same in
    every row, so unpadded) with ``last_only``, then the continuations right-padded. Only the
    continuation slots produce logits, not (B, prompt + continuation, vocab)."""
    _check_tokens("prompt", prompt, runner.vocab_size)
    for j, c in enumerate(continuations):
        _check_tokens(f"continuation {j}", c, runner.vocab_size)
        if len(prompt) + len(c) > runner.max_context:
            raise LayercakeError(
                f"prompt + continuation {j} is {len(prompt) + len(c)} tokens, more than the "
                f"model's context of {runner.max_context}"
            )
    if not continuations:
        return []
    B, P, dev = len(continuations), len(prompt), runner.device
    C = max(len(c) for c in continuations)
    with torch.inference_mode():
        cache = runner.new_cache(B, P + C - 1)
        tokens = torch.tensor([prompt], device=dev).repeat(B, 1)
        positions = torch.arange(P, device=dev).expand(B, P)
        first = runner.forward(tokens, positions, cache, last_only=True)  # (B, 1, V)
        if C > 1:  # feed every continuation token but the last: its prediction is not needed
            rest = torch.zeros(B, C - 1, dtype=torch.long)
            mask = torch.zeros(B, C - 1, dtype=torch.bool)
            for j, c in enumerate(continuations):
                rest[j, : len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
                mask[j, : len(c) - 1] = True
            positions = torch.arange(P, P + C - 1, device=dev).expand(B, C - 1)
            later = runner.forward(rest.to(dev), positions, cache, token_mask=mask.to(dev))
            first = torch.cat([first, later], dim=1)  # (B, C, V): slot t predicts token t
        targets = torch.zeros(B, C, dtype=torch.long)
        for j, c in enumerate(continuations):
            targets[j, : len(c)] = torch.tensor(c, dtype=torch.long)
        targets = targets.to(dev)
        logprobs = torch.log_softmax(first.float(), -1)
        token_lp = logprobs.gather(2, targets.unsqueeze(2)).squeeze(2).tolist()  # (B, C)
        greedy = (first.argmax(-1) == targets).tolist()
    results = []
    for j, c in enumerate(continuations):
        lps = token_lp[j][: len(c)]
        results.append(ScoreResult(sum(lps), sum(lps) / len(lps), lps, all(greedy[j][: len(c)])))
    return results

"""Sampling: per-request parameters and the vectorized logits -> next-token step.

Order of operations, as in Hugging Face and vLLM: penalties on the raw logits (repetition, then
frequency/presence), then temperature, top-k, top-p, min-p, then one draw per row. Greedy rows
(temperature 0) take the argmax of the penalized logits.

Truncation never sorts the whole vocabulary when it can help it: a full sort of (64, 128256) fp32
costs ~0.5 s on a small CPU, ``topk(64)`` a tenth of that. Each row's kept set is a prefix of its
sorted logits, so it is computed on the top-K candidates, and a row whose set may run past the
K-th candidate is redone with a larger K (finally the full sort).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from layercake.errors import LayercakeError
from layercake.sampling_ops import (
    apply_frequency_presence_penalties,
    apply_repetition_penalty,
    apply_temperature,
    argmax_rows,
    draw_uniforms,
    make_finite,
    sample_from_logits,
)

MAX_LOGPROBS = 20  # top alternatives per token, as OpenAI's top_logprobs and vLLM's default cap
GREEDY_BELOW = 1e-5  # a temperature under this is greedy (vLLM's _SAMPLING_EPS): dividing by it
# would overflow fp32, and the distribution is one-hot to within float rounding anyway
MAX_SCALE = 1e30  # temperatures and repetition penalties are clamped to [1 / this, this] in fp32
MIN_LOGPROB = -9999.0  # reported instead of -inf (OpenAI's floor; JSON has no -inf)


@dataclass
class SamplingParams:
    """How to pick the tokens of one request (OpenAI / vLLM names and meanings)."""

    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # nucleus mass in (0, 1]; 1 = off
    min_p: float = 0.0  # drop tokens with p < min_p * p_max; 0 = off
    repetition_penalty: float = 1.0  # HF/CTRL: seen tokens (prompt + output) divided/multiplied
    frequency_penalty: float = 0.0  # OpenAI: minus penalty * count in the output so far
    presence_penalty: float = 0.0  # OpenAI: minus penalty once if in the output so far
    seed: int | None = None  # same seed, same params, same prompt -> same tokens
    stop: list[str] = field(default_factory=list)  # stop strings, excluded from the output text
    ignore_eos: bool = False
    max_new_tokens: int = 16  # OpenAI's and vLLM's default max_tokens
    logprobs: int | None = None  # None: no logprobs; 0: chosen token only; N: plus top N

    def validate(self) -> None:
        """Raise LayercakeError naming the first invalid value."""
        _real("temperature", self.temperature, lo=0.0)
        _integer("top_k", self.top_k, lo=0)
        _real("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise LayercakeError(f"top_p must be in (0, 1], got {self.top_p}")
        _real("min_p", self.min_p, lo=0.0, hi=1.0)
        _real("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0.0:
            raise LayercakeError(
                f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}"
            )
        _real("frequency_penalty", self.frequency_penalty, lo=-2.0, hi=2.0)
        _real("presence_penalty", self.presence_penalty, lo=-2.0, hi=2.0)
        if self.seed is not None:
            _integer("seed", self.seed, lo=0, hi=2**64 - 1)
        if not isinstance(self.stop, (list, tuple)) or not all(
            isinstance(s, str) and s for s in self.stop
        ):
            raise LayercakeError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if not isinstance(self.ignore_eos, bool):
            raise LayercakeError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        _integer("max_new_tokens", self.max_new_tokens, lo=1)
        if self.logprobs is not None:
            _integer("logprobs", self.logprobs, lo=0, hi=MAX_LOGPROBS)


def _real(name: str, value: object, lo: float | None = None, hi: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LayercakeError(f"{name} must be a finite number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"between {lo} and {hi}" if lo is not None and hi is not None else f">= {lo}"
        raise LayercakeError(f"{name} must be {bounds}, got {value}")


def _integer(name: str, value: object, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise LayercakeError(f"{name} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bounds = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise LayercakeError(f"{name} must be {bounds}, got {value}")


@dataclass
class TokenLogprob:
    """Log-probability of a chosen token under the model's raw distribution, with alternatives."""

    token_id: int
    logprob: float
    top_logprobs: dict[int, float]  # the N most likely tokens (may include the chosen one)


# ---- penalties (in place on (B, V) fp32 logits; token ids as (B, S) LongTensors) ----------


@dataclass
class SampleStep:
    """One sampled token per row."""

    tokens: torch.Tensor  # (B,) long, on the logits' device: the next input, no host round trip
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


class Sampler:
    """Samples the next token of every row of a batch whose rows may each have their own
    ``SamplingParams``. Per-row values become tensors once per batch; each row draws from its
    own ``torch.Generator`` (seeded from ``seed``, or from torch's global RNG when None)."""

    def __init__(
        self,
        params: list[SamplingParams],
        vocab_size: int,
        prompts: list[list[int]] | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        for p in params:
            p.validate()
        self.params = list(params)
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.generators = [
            torch.Generator().manual_seed(
                p.seed if p.seed is not None else int(torch.randint(0, 2**62, ()).item())
            )
            for p in self.params
        ]
        # token history for the penalties: prompts left-padded with each row's own first token
        # (a duplicate id is harmless to the gather/scatter penalties), then the outputs
        prompts = prompts if prompts is not None else [[] for _ in params]
        if len(prompts) != len(params):
            raise LayercakeError(f"{len(prompts)} prompts but {len(params)} sampling params")
        self.n_prompt = max((len(t) for t in prompts), default=0)
        self.n_out = 0
        self.history: torch.Tensor | None = None
        if any(
            p.repetition_penalty != 1 or p.frequency_penalty or p.presence_penalty for p in params
        ):
            cap = self.n_prompt + max(p.max_new_tokens for p in params)
            hist = torch.zeros(len(params), cap, dtype=torch.long)
            for i, t in enumerate(prompts):
                if t:
                    hist[i, : self.n_prompt - len(t)] = t[0]
                    hist[i, self.n_prompt - len(t) : self.n_prompt] = torch.tensor(t)
                elif self.n_prompt:
                    raise LayercakeError(f"prompt {i} is empty")
            self.history = hist.to(self.device)
        self._build()

    def _build(self) -> None:
        """Per-row tensors and the row groups (greedy / plain sampling / truncated sampling)."""
        ps, dev, V = self.params, self.device, self.vocab_size

        def col(xs: list[float]) -> torch.Tensor:
            return torch.tensor(xs, dtype=torch.float32, device=dev).unsqueeze(1)  # (B, 1)

        greedy = [p.temperature < GREEDY_BELOW for p in ps]
        # greedy rows get neutral values: their draw is thrown away, so never pay for it
        self.temperature = col(
            [1.0 if g else min(p.temperature, MAX_SCALE) for p, g in zip(ps, greedy)]
        )
        self.top_k = torch.tensor(
            [0 if g or p.top_k >= V else p.top_k for p, g in zip(ps, greedy)], device=dev
        )
        self.top_p = col([1.0 if g else p.top_p for p, g in zip(ps, greedy)])
        self.min_p = col([0.0 if g else p.min_p for p, g in zip(ps, greedy)])
        self.repetition = col([p.repetition_penalty for p in ps]).clamp_(1 / MAX_SCALE, MAX_SCALE)
        self.frequency = col([p.frequency_penalty for p in ps])
        self.presence = col([p.presence_penalty for p in ps])
        self.use_repetition = any(p.repetition_penalty != 1 for p in ps)
        self.use_freq_pres = any(p.frequency_penalty or p.presence_penalty for p in ps)
        truncated = [
            not g and (0 < p.top_k < V or p.top_p < 1 or p.min_p > 0) for p, g in zip(ps, greedy)
        ]
        kinds = [
            "greedy" if g else "truncated" if t else "plain" for g, t in zip(greedy, truncated)
        ]
        self.groups: dict[str, torch.Tensor | None] = {}  # None = every row
        for kind in ("greedy", "plain", "truncated"):
            rows = [i for i, k in enumerate(kinds) if k == kind]
            if len(rows) == len(ps):
                self.groups[kind] = None
            elif rows:
                self.groups[kind] = torch.tensor(rows, device=dev)
        self.sampled_rows = [i for i, k in enumerate(kinds) if k != "greedy"]
        self.logprob_rows = [i for i, p in enumerate(ps) if p.logprobs is not None]

    @property
    def plain_greedy(self) -> bool:
        """Every row greedy, without penalties or logprobs: its tokens are the argmax of its
        logits alone, so the rows of several such samplers can be picked in one call
        (``greedy_tokens``, then ``record``)."""
        return self.history is None and not self.logprob_rows and list(self.groups) == ["greedy"]

    def record(self, tokens: torch.Tensor) -> SampleStep:
        """The step of a ``plain_greedy`` sampler whose tokens (B,) were picked outside it by
        ``greedy_tokens``: what ``sample`` would have returned."""
        self.n_out += 1
        token_ids = tokens.tolist()
        return SampleStep(tokens, token_ids, [None] * len(token_ids))

    def select(self, rows: list[int]) -> None:
        """Keep only ``rows`` of the batch, in this order (after finished rows are dropped)."""
        self.params = [self.params[i] for i in rows]
        self.generators = [self.generators[i] for i in rows]
        if self.history is not None:
            self.history = self.history[torch.tensor(rows, device=self.device)]
        self._build()

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor) -> SampleStep:
        """Next token of each row from its last-position logits (B, V). Modifies ``logits`` in
        place when they are fp32. Logprobs are ``log_softmax`` of the raw logits, before any
        penalty, temperature or truncation: the model's distribution, as OpenAI and vLLM report
        by default."""
        logits = make_finite(logits.float())
        raw_logprobs = None
        if self.logprob_rows:  # before penalties and temperature change logits in place
            all_rows = len(self.logprob_rows) == len(self.params)
            raw_logprobs = torch.log_softmax(logits if all_rows else logits[self.logprob_rows], -1)
        self._penalize(logits)
        tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        if self.sampled_rows:
            u = draw_uniforms(self.generators, self.sampled_rows).to(logits.device)
        for kind, rows in self.groups.items():
            pick = (lambda t: t) if rows is None else (lambda t: t[rows])  # noqa: B023
            x = pick(logits)
            if kind == "greedy":
                out = argmax_rows(make_finite(x))
            else:  # penalties and temperature may overflow to inf: finite again before drawing
                x = make_finite(apply_temperature(x, pick(self.temperature)))
                cut = (pick(self.top_k), pick(self.top_p), pick(self.min_p))
                out = sample_from_logits(x, pick(u), cut if kind == "truncated" else None)
            if rows is None:
                tokens = out
            else:
                tokens[rows] = out
        if self.history is not None:
            self.history[:, self.n_prompt + self.n_out] = tokens
        self.n_out += 1
        token_ids = tokens.tolist()
        return SampleStep(tokens, token_ids, self._logprobs(raw_logprobs, tokens, token_ids))

    def _penalize(self, logits: torch.Tensor) -> None:
        if self.history is None:
            return
        end = self.n_prompt + self.n_out
        if self.use_repetition and end:
            apply_repetition_penalty(logits, self.history[:, :end], self.repetition)
        if self.use_freq_pres and self.n_out:
            out = self.history[:, self.n_prompt : end]
            apply_frequency_presence_penalties(logits, out, self.frequency, self.presence)

    def _logprobs(
        self, raw: torch.Tensor | None, tokens: torch.Tensor, token_ids: list[int]
    ) -> list[TokenLogprob | None]:
        entries: list[TokenLogprob | None] = [None] * len(token_ids)
        if raw is None:
            return entries
        rows = self.logprob_rows
        chosen = tokens if len(rows) == len(token_ids) else tokens[rows]
        raw = raw.clamp(min=MIN_LOGPROB)
        lp = raw.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
        n_top = min(raw.shape[1], max(self.params[i].logprobs or 0 for i in rows))
        top = raw.topk(n_top, dim=-1)
        top_ids, top_vals = top.indices.tolist(), top.values.tolist()
        for j, i in enumerate(rows):
            n = self.params[i].logprobs or 0
            alternatives = dict(zip(top_ids[j][:n], top_vals[j][:n]))
            entries[i] = TokenLogprob(token_ids[i], lp[j], alternatives)
        return entries


@torch.inference_mode()
def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """The argmax of each row of (B, V) ``logits`` (made finite in place when fp32), as a
    ``plain_greedy`` sampler's ``sample`` picks it."""
    return argmax_rows(make_finite(make_finite(logits.float())))

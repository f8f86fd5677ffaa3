"""Perplexity of a model on a text: a strided sliding window (as transformers' guide computes
it), fp32 log-probabilities, through any Runner (local, offloaded, compressed).

Each window holds up to ``window`` tokens and scores only the tokens the previous window did not
(at most ``stride`` of them), so every scored token but the first window's sees at least
``window - stride`` tokens of context. A window runs in chunks of ``chunk`` tokens through the KV
cache, as generation does: a compressed cache is read back for every chunk after the first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from layercake.errors import LayercakeError
from layercake.runner import Runner


@dataclass(frozen=True)
class Perplexity:
    ppl: float  # exp(nll)
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # tokens scored


@torch.inference_mode()
def perplexity(
    runner: Runner, ids: list[int], window: int = 1024, stride: int = 512, chunk: int = 256
) -> Perplexity:
    """Perplexity of token ids ``ids`` (the first token is context only)."""
    n = len(ids)
    if n < 2:
        raise LayercakeError("perplexity needs at least two tokens")
    if not 0 < stride <= window or chunk < 1:
        raise LayercakeError("perplexity: need 0 < stride <= window and chunk >= 1")
    window = min(window, runner.max_context)
    stride = min(stride, window)
    tokens = torch.tensor(ids, dtype=torch.long)
    total, count = 0.0, 0
    scored_to, begin = 1, 0  # targets [1, scored_to) are scored; the window starts at begin
    while scored_to < n:
        end = min(begin + window, n)
        cache = runner.new_cache(1, end - begin)
        for c0 in range(begin, end, chunk):
            c1 = min(c0 + chunk, end)
            pos = torch.arange(c0 - begin, c1 - begin)[None]
            logits = runner.forward(tokens[None, c0:c1], pos, cache)[0].float()  # (T, V)
            # the logits at index t predict token t + 1: targets in [lo, hi) of this window
            lo, hi = max(c0 + 1, scored_to), min(c1 + 1, end)
            if hi > lo:
                logp = torch.log_softmax(logits[lo - 1 - c0 : hi - 1 - c0], dim=-1)
                total -= logp.gather(1, tokens[lo:hi, None]).sum().item()
                count += hi - lo
        scored_to, begin = end, begin + stride
    nll = total / count
    return Perplexity(math.exp(nll), nll, count)

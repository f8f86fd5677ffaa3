"""The vectorized logits operations of a sampling step: penalties, temperature, truncation
(top-k, top-p, min-p, computed on the top candidates, not a full sort), the draw. Total over
every value ``SamplingParams`` accepts: inf/NaN logits and extreme parameters never raise."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

FIRST_CANDIDATES = 64  # first K tried for truncation; grows x16 for rows that need more


def apply_repetition_penalty(
    logits: torch.Tensor, token_ids: torch.Tensor, penalty: torch.Tensor
) -> torch.Tensor:
    """CTRL / HF ``RepetitionPenaltyLogitsProcessor``: logits of tokens in ``token_ids`` (B, S)
    are divided by ``penalty`` (B, 1) if positive, multiplied if negative. Repeated ids are fine:
    every copy writes the same value. Touches only B*S entries, never the whole vocabulary."""
    seen = logits.gather(1, token_ids)  # (B, S)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter_(1, token_ids, seen)


def apply_frequency_presence_penalties(
    logits: torch.Tensor,
    output_ids: torch.Tensor,
    frequency: torch.Tensor,
    presence: torch.Tensor,
) -> torch.Tensor:
    """OpenAI: ``logit[j] -= count[j] * frequency + (count[j] > 0) * presence`` over the tokens
    generated so far, ``output_ids`` (B, S); ``frequency``/``presence`` are (B, 1)."""
    S = output_ids.shape[1]
    logits.scatter_add_(1, output_ids, (-frequency).expand(-1, S))  # once per occurrence
    seen = logits.gather(1, output_ids)  # duplicates read (and write back) the same value
    return logits.scatter_(1, output_ids, seen - presence)  # so presence counts once


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Divide each row by its temperature (B, 1), in place; rows must have temperature > 0."""
    return logits.div_(temperature)


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)``: the first index of each row's maximum, taken by ``max(-1)``, which
    returns the same index (first maximum, per PyTorch's documentation of both) several times
    faster on the CPU (README, "Serving")."""
    return logits.max(-1).indices


def make_finite(logits: torch.Tensor) -> torch.Tensor:
    """Make every row of (B, V) fp32 ``logits`` a distribution softmax can take, in place: NaN
    counts as -inf (never chosen); a row with +inf entries keeps only those, equally likely (the
    limit of growing logits); a row with nothing above -inf becomes uniform. One pass over the
    logits, allocating nothing, when they are all finite (the usual case): a finite sum has no
    NaN or inf in it (``isfinite(...).all()`` allocates two vocabulary-sized temporaries per
    row, which cost more than the sampling itself at a large vocabulary)."""
    if bool(torch.isfinite(logits.sum())):
        return logits
    logits.masked_fill_(logits.isnan(), -math.inf)
    top = logits == math.inf
    rows = top.any(1)
    if bool(rows.any()):
        logits[rows] = torch.zeros_like(logits[rows]).masked_fill_(~top[rows], -math.inf)
    dead = (logits == -math.inf).all(1)
    if bool(dead.any()):
        logits[dead] = 0.0
    return logits


# ---- truncation: top-k, top-p, min-p ------------------------------------------------------


def _keep_sorted(
    vals: torch.Tensor,  # (R, K) candidate logits, sorted descending
    top_k: torch.Tensor,  # (R,) long, 0 = off
    top_p: torch.Tensor,  # (R, 1)
    min_p: torch.Tensor,  # (R, 1)
    lse: torch.Tensor | None,  # (R, 1) logsumexp of the full rows (needed by top-p w/o top-k)
    exact: bool,  # K is the whole vocabulary
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep mask (R, K) and whether it is complete, i.e. no token past the K-th can be kept.

    Every filter keeps a prefix of the sorted order, so if the K-th candidate is dropped, all
    later tokens are too."""
    has_k = (top_k > 0).unsqueeze(1)  # (R, 1)
    kth = vals.gather(1, (top_k.clamp(1, vals.shape[1]) - 1).unsqueeze(1))  # (R, 1)
    in_k = (vals >= kth) | ~has_k  # ties with the k-th value stay, as in HF's TopKLogitsWarper
    keep = in_k
    use_p = top_p < 1.0  # (R, 1)
    if bool(use_p.any()):
        # top-p renormalizes over what top-k left (HF applies the warpers in this order)
        masked = vals.masked_fill(~in_k, -math.inf)
        norm = masked.logsumexp(-1, keepdim=True)
        if lse is not None:
            norm = torch.where(has_k, norm, lse)
        probs = (masked - norm).exp()
        before = probs.cumsum(-1) - probs  # mass strictly ahead of each token
        keep = keep & ((before < top_p) | ~use_p)
    keep = keep & (vals >= vals[:, :1] + min_p.log())  # p >= min_p * p_max; log(0) = -inf
    keep[:, 0] = True  # the most likely token always stays, whatever rounding did above
    if exact:
        return keep, torch.ones_like(keep[:, 0])
    # with the top-k set cut short, top-p's normalizer above was too small
    return keep, ~keep[:, -1] & ~(has_k[:, 0] & in_k[:, -1] & use_p[:, 0])


def _truncated_sets(
    logits: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    first_k: int = FIRST_CANDIDATES,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (rows, vals, ids, keep) groups that together cover every row once: ``vals``/``ids``
    (R, K) are each row's top-K logits and token ids (descending), ``keep`` the kept ones."""
    B, V = logits.shape
    lse = logits.logsumexp(-1, keepdim=True) if bool((top_p < 1.0).any()) else None
    rows = torch.arange(B, device=logits.device)
    K = min(V, max(first_k, int(top_k.max()) if B else 0))
    while rows.numel():
        sub = logits if rows.numel() == B else logits[rows]
        if K < V:
            vals, ids = sub.topk(K, dim=-1)
        else:
            vals, ids = sub.sort(dim=-1, descending=True)
        keep, done = _keep_sorted(
            vals, top_k[rows], top_p[rows], min_p[rows], None if lse is None else lse[rows], K == V
        )
        if bool(done.all()):
            yield rows, vals, ids, keep
            return
        yield rows[done], vals[done], ids[done], keep[done]
        rows, K = rows[~done], min(V, K * 16)


def filter_logits(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Logits (B, V) with the tokens that top-k, then top-p, then min-p drop set to -inf
    (a new tensor). ``top_k`` (B,) long (0 = off), ``top_p`` and ``min_p`` (B, 1)."""
    out = torch.full_like(logits, -math.inf)
    for rows, vals, ids, keep in _truncated_sets(logits, top_k, top_p, min_p):
        kept = vals.masked_fill(~keep, -math.inf)
        out[rows] = out[rows].scatter_(1, ids, kept)
    return out


# ---- drawing ------------------------------------------------------------------------------


def sample_from_probs(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: one index per row of ``probs`` (R, N) from ``uniforms`` (R, 1) in
    [0, 1). Needs one random number per row instead of N (exponential race: ~0.4 s per step
    at (64, 128256) on CPU). Zero-probability entries are never chosen."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    # u stays strictly below the total, so the first cdf entry above u exists and is a jump
    u = torch.minimum(uniforms * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(1)


def sample_from_logits(
    logits: torch.Tensor,
    uniforms: torch.Tensor,
    truncate: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Draw one token per row of temperature-scaled ``logits`` (B, V), after the optional
    truncation ``(top_k, top_p, min_p)`` (as in ``filter_logits``); ``uniforms`` (B, 1)
    supplies each row's randomness."""
    if truncate is None:
        return sample_from_probs(torch.softmax(logits, -1), uniforms)
    tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    for rows, vals, ids, keep in _truncated_sets(logits, *truncate):
        probs = torch.softmax(vals.masked_fill(~keep, -math.inf), -1)
        pick = sample_from_probs(probs, uniforms[rows])
        tokens[rows] = ids.gather(1, pick.unsqueeze(1)).squeeze(1)
    return tokens


def draw_uniforms(generators: list[torch.Generator], rows: list[int] | None = None) -> torch.Tensor:
    """One U[0, 1) number per row (B, 1) on the CPU, each from its row's own generator, so a
    seeded row gives the same tokens whatever else shares its batch. Rows not in ``rows`` get
    0 and do not advance their generator."""
    u = torch.zeros(len(generators), 1)
    for i in range(len(generators)) if rows is None else rows:
        torch.rand(1, generator=generators[i], out=u[i])
    return u


# ---- the per-batch sampler -----------------------------------------------------------------

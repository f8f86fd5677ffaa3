"""Prefill: the prompts of a batch written into their rows of the KV cache, each computed as it
would be alone (``prefill``), or as one left-padded forward (``left_pad``)."""

from __future__ import annotations

import torch

from layercake.errors import LayercakeError
from layercake.kv_cache import KVCache
from layercake.runner import Runner


def left_pad(
    seqs: list[list[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """tokens, positions (B, L) and token_mask (None when no row is padded)."""
    L = max(len(s) for s in seqs)
    tokens = torch.zeros(len(seqs), L, dtype=torch.long)
    positions = torch.zeros(len(seqs), L, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.bool)
    for i, s in enumerate(seqs):
        tokens[i, L - len(s) :] = torch.tensor(s, dtype=torch.long)
        positions[i, L - len(s) :] = torch.arange(len(s))
        mask[i, L - len(s) :] = True
    padded = any(len(s) != L for s in seqs)
    return tokens.to(device), positions.to(device), mask.to(device) if padded else None


def prefill(
    runner: Runner, cache: KVCache, prompts: list[list[int]], rows: list[int]
) -> torch.Tensor:
    """Write each prompt into its row of ``cache`` (``rows``), ending at ``cache.length`` (the
    slots in front of it become padding); the last logits of each prompt (len(prompts), V).

    Prompts of the same length run together, each length on its own and unpadded, from slot 0
    (aside, then copied into the rows, unless that is where they go), so what a row computes is
    exactly what it computes alone, bit for bit, whatever else is in the batch. Left padding
    would change the count and places of the keys in the attention's sums, and a kernel that
    quantizes activations (``--packed``) turns such float rounding into different tokens."""
    dev, length = runner.device, cache.length
    if not all(isinstance(t, torch.Tensor) for t in cache.tensors()):  # quantized: no staging
        return _padded_prefill(runner, cache, prompts, rows)
    lengths: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        lengths.setdefault(len(p), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(prompts)
    for P, idx in lengths.items():
        tokens = torch.tensor([prompts[i] for i in idx], device=dev)
        positions = torch.arange(P, device=dev).expand(len(idx), P)
        at = [rows[i] for i in idx]
        if P == length and at == list(range(at[0], at[0] + len(at))):  # in place
            view = cache.rows(at[0], at[-1] + 1, 0)
            logits = runner.forward(tokens, positions, view, None, last_only=True)
        else:
            staging = cache.like(len(idx), P)
            logits = runner.forward(tokens, positions, staging, None, last_only=True)
            cache.load_rows(torch.tensor(at, device=dev), staging, length - P)
        for j, i in enumerate(idx):
            out[i] = logits[j, -1]
    return torch.stack(out)


def _padded_prefill(
    runner: Runner, cache: KVCache, prompts: list[list[int]], rows: list[int]
) -> torch.Tensor:
    """``prefill`` as one left-padded forward, in place (rows must be consecutive): for caches
    that cannot be staged (a quantized one). Rows match their solo runs to float rounding."""
    if rows != list(range(rows[0], rows[0] + len(rows))):
        raise LayercakeError("a quantized KV cache takes new prompts in consecutive rows only")
    tokens, positions, mask = left_pad(prompts, runner.device)
    at = cache.length - tokens.shape[1]
    view = cache.rows(rows[0], rows[-1] + 1, at)
    view.valid[:, :at] = False
    return runner.forward(tokens, positions, view, mask, last_only=True)[:, -1]

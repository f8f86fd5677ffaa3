"""The embedding rows of a greedy step's next tokens, taken from a tied head as it projects.

With tied embeddings the head's weight is the embedding table. A head's pass has every
vocabulary row in memory at some point (held, or in a staging slot while its slab runs), so it
keeps, per row of the batch, the weight row of its best logit so far (``ArgmaxRows``): the next
step's lookup of the chosen token then reads no page of the table. Under a memory cap the table
(128256 x 2048 bf16: 525 MB) is a cold memory map, and a lookup faults a page per token, each
read queued behind the streamed weights' reads on the same disk (measured 79-229 ms a step for
32 tokens on a throttled hostsim host). Rows are keyed by token id and copied bit for bit, so a
lookup served from them equals the table's, whatever the sampler chose.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from layercake.models.layers import Embedding


def head_is_tied(model: nn.Module, ckpt: Any) -> bool:
    """Whether ``model``'s head reads the embedding table of checkpoint ``ckpt``, stored as plain
    floats (a block-quantized one may be dequantized differently by the head and the lookup)."""
    tied = getattr(model, "tied", {}).get("lm_head.weight")
    names = set(ckpt.tensor_names())
    if tied is None or model.source_name("lm_head.weight", names) != tied:
        return False
    stored = ckpt.stored_dtype(tied)
    return stored is not None and stored.is_floating_point


def token_embedding(model: nn.Module) -> Embedding | None:
    """The token embedding of ``model`` (the table its head reads when tied), if this slice
    holds it."""
    tied = getattr(model, "tied", {}).get("lm_head.weight")
    if tied is None or not tied.endswith(".weight"):
        return None
    try:
        module = model.get_submodule(tied[: -len(".weight")])
    except AttributeError:  # the slice does not hold the embeddings
        return None
    return module if isinstance(module, Embedding) else None


def runner_embedding(runner: Any) -> Embedding | None:
    """The token embedding of a runner's model (an offloaded runner's ``model``, a resident
    one's ``slices``), or None."""
    models = [runner.model] if hasattr(runner, "model") else getattr(runner, "slices", [])
    for m in models:
        emb = token_embedding(m)
        if emb is not None:
            return emb
    return None


def weight_rows(w: Any, idx: torch.Tensor) -> torch.Tensor | None:
    """Rows ``idx`` of a head weight as it is held: a dense tensor, or bf16 row blocks in order
    (``ops.BF16``, its rows in several tiers); None for a form whose rows are not the table's
    values (quantized)."""
    if isinstance(w, torch.Tensor):
        return w[idx]
    data = getattr(w, "data", None) if getattr(w, "form", None) == "bf16" else None
    if data is None:
        return None
    parts = data if isinstance(data, list) else [data]
    out = parts[0].new_empty((len(idx), parts[0].shape[1]))
    start = 0
    for part in parts:
        inside = (idx >= start) & (idx < start + part.shape[0])
        if inside.any():
            out[inside] = part[idx[inside] - start]
        start += part.shape[0]
    return out


class ArgmaxRows:
    """Per micro-batch of a head's pass: each row's best logit so far, its token id, and that
    token's weight row, updated slab by slab (vocabulary columns in any order)."""

    def __init__(self) -> None:
        self.best: dict[int, list[torch.Tensor]] = {}  # micro-batch -> [values, ids, rows]
        self.failed = False  # a slab's weight form has no exact rows: keep none

    def update(self, k: int, logits: torch.Tensor, col: int, w: Any) -> None:
        """``logits`` (b, n): micro-batch k's last-position logits of columns [col, col + n)."""
        if self.failed:
            return
        vals, idx = logits.max(-1)
        cur = self.best.get(k)
        better = torch.ones_like(vals, dtype=torch.bool) if cur is None else vals > cur[0]
        if not better.any():
            return
        rows = weight_rows(w, idx[better])
        if rows is None:
            self.failed = True
            return
        if cur is None:
            self.best[k] = [vals, idx + col, rows]
            return
        cur[0][better] = vals[better]
        cur[1][better] = idx[better] + col
        cur[2][better] = rows.to(cur[2].dtype)

    def rows(self) -> dict[int, torch.Tensor]:
        """Token id -> its weight row (the table's row, as the head holds it)."""
        if self.failed:
            return {}
        out: dict[int, torch.Tensor] = {}
        for _, ids, rows in self.best.values():
            out.update(zip(ids.tolist(), rows.unbind()))
        return out

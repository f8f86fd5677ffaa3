"""Whether two engines computed the same thing: greedy tokens and logits (numpy only, so the
benchmarks' parent processes can use it without importing torch).

Logits agree when their largest absolute difference is under ``REL_TOL`` of the reference's
spread (standard deviation) and every greedy choice is the same. An engine that skips the
layers of a non-degenerate checkpoint misses both by far (``tests/test_bench.py``).
"""

from __future__ import annotations

import numpy as np

REL_TOL = 0.05  # bf16-as-stored vs fp32 matmuls differ by ~1 % of the logits' spread


def logits_agreement(ref: np.ndarray, out: np.ndarray) -> dict:
    """Max abs difference, the reference's spread, the share of equal argmaxes and the
    verdict, for logits of the same shape (..., vocab)."""
    ref, out = np.asarray(ref, np.float32), np.asarray(out, np.float32)
    if ref.shape != out.shape:
        return {"logits_agree": False, "why": f"shapes {ref.shape} vs {out.shape}"}
    diff = float(np.abs(ref - out).max())
    spread = float(ref.std())
    same = float((ref.argmax(-1) == out.argmax(-1)).mean())
    return {
        "logits_max_abs_diff": round(diff, 5),
        "logits_ref_std": round(spread, 5),
        "same_argmax": round(same, 4),
        "logits_agree": bool(diff <= REL_TOL * spread and same == 1.0),
    }


def tokens_agreement(ref: list[list[int]], out: list[list[int]]) -> dict:
    """Equal greedy sequences: the share of equal positions and whether all are equal."""
    pairs = [(x, y) for r, o in zip(ref, out) for x, y in zip(r, o)]
    same = sum(x == y for x, y in pairs) / max(1, len(pairs))
    return {"same_tokens": round(same, 4), "tokens_agree": bool(pairs) and same == 1.0}

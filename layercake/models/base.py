"""What every family's model slice shares: the layer loop over a caller-owned KV cache."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from layercake.checkpoint.parts import Parts
from layercake.config import BaseConfig
from layercake.kv_cache import AttentionStep, KVCache


class DecoderSlice(nn.Module):
    """A slice (part spec) of a decoder-only model, a plain ``nn.Module`` with HF parameter names.

    ``forward(x, positions, cache, step)``: ``x`` is token ids (B, T) when the slice holds the
    embeddings, else hidden states (B, T, hidden); returns logits (B, T, vocab) when it holds the
    head, else hidden states. Subclasses define ``embed``, ``blocks``, ``head`` and ``context``.
    """

    # checkpoint name -> name to load instead when the first is absent (tied embeddings)
    tied: dict[str, str] = {}

    def __init__(self, config: BaseConfig, parts: Parts) -> None:
        super().__init__()
        self.config = config
        self.parts = parts

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def blocks(self) -> nn.ModuleDict:
        """Layer modules keyed by str(global layer index)."""
        raise NotImplementedError

    def head(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def context(self, positions: torch.Tensor, dtype: torch.dtype) -> Any:
        """Per-forward data shared by all layers (e.g. rotary cos/sin)."""
        return None

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        step: AttentionStep,
        last_only: bool = False,
        span: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """``span`` = (lo, hi) runs only the held layers in [lo, hi): a slice with several
        ranges runs one range per call, in model order. The embeddings run with the slice's
        first range, the head with its last."""
        ranges = self.parts.ranges()
        first = span is None or not ranges or span[0] <= ranges[0][0]
        last = span is None or not ranges or span[1] >= ranges[-1][1]
        h = self.embed(x, positions) if self.parts.embed and first else x  # (B, T, hidden)
        ctx = self.context(positions, h.dtype)
        for name, block in self.blocks().items():
            i = int(name)
            if span is None or span[0] <= i < span[1]:
                h = block.forward(h, ctx, cache.keys[i], cache.values[i], step)  # no hooks
        if not (self.parts.head and last):
            return h
        if last_only:
            h = h[:, -1:]
        return self.head(h)  # (B, T, vocab)

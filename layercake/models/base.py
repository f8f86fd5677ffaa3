"""What every family's model slice shares: the layer loop over a caller-owned KV cache."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
from torch import nn

from layercake.config import BaseConfig
from layercake.kv_cache import AttentionStep, KVCache
from layercake.models.parts import Parts


class DecoderSlice(nn.Module):
    """A slice (part spec) of a decoder-only model, a plain ``nn.Module`` with HF parameter names.

    ``forward(x, positions, cache, step)``: ``x`` is token ids (B, T) when the slice holds the
    embeddings, else hidden states (B, T, hidden); returns logits (B, T, vocab) when it holds the
    head, else hidden states. Subclasses define ``embed``, ``layers``, ``final_norm`` and
    ``context``.
    """

    # checkpoint name -> name to load instead when the first is absent (tied embeddings)
    tied: dict[str, str] = {}

    @classmethod
    def source_name(cls, name: str, names: Collection[str]) -> str:
        """The checkpoint tensor (of ``names``) that holds parameter ``name``: itself, else the
        one it is tied to (an output head tied to the embeddings); ``name`` when neither is
        there, for the caller to report."""
        if name in names:
            return name
        alt = cls.tied.get(name)
        return alt if alt is not None and alt in names else name

    def __init__(self, config: BaseConfig, parts: Parts) -> None:
        super().__init__()
        self.config = config
        self.parts = parts

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def layers(self) -> nn.ModuleDict:
        """Layer modules keyed by str(global layer index)."""
        raise NotImplementedError

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        """What runs on the last hidden states before the vocabulary projection (the final
        norm, and any projection to the head's width)."""
        raise NotImplementedError

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """Normed hidden states -> logits (B, T, vocab)."""
        return self.lm_head(h)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states -> logits: ``project(final_norm(h))`` (the offload executor runs the
        two apart, the projection in slabs of vocabulary rows)."""
        return self.project(self.final_norm(h))

    def context(self, positions: torch.Tensor, dtype: torch.dtype) -> Any:
        """Per-forward data shared by all layers (e.g. rotary cos/sin)."""
        return None

    def flat(self, ctx: Any, cache_k: object, step: AttentionStep) -> bool:
        """Whether this one-token step runs the layers on 2-D hidden states (B, hidden): the
        family's layers take that lean form (fewer reshapes and checks per layer) for ``ctx``,
        the first held layer's cache ``cache_k`` and ``step``."""
        return False

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
        layers = self.layers()
        B, T = h.shape[:2]
        first = next(iter(layers), None)
        flat = T == 1 and first is not None and self.flat(ctx, cache.keys[int(first)], step)
        if flat:
            h = h.view(B, -1)  # (B, hidden) through the layers
        for name, layer in layers.items():
            i = int(name)
            if span is None or span[0] <= i < span[1]:
                h = layer.forward(h, ctx, cache.keys[i], cache.values[i], step)  # no hooks
        if flat:
            h = h.view(B, 1, -1)
        if not (self.parts.head and last):
            return h
        if last_only:
            h = h[:, -1:]
        return self.head(h)  # (B, T, vocab)

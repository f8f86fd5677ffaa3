"""Qwen3 (HF model_type qwen3): the Llama decoder with an RMS norm on each query and key head
before the rotary embedding, and no q/k/v biases (``attention_bias``, off in every release)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from layercake.errors import LayercakeError
from layercake.models import llama
from layercake.models.llama import Model

__all__ = ["Config", "Model", "without_window"]


class Config(llama.Config):
    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> Config:
        return replace(without_window(d, super().from_hf(d)), qk_norm="head")


def without_window(d: dict[str, Any], config: llama.Config) -> llama.Config:
    """A Qwen config attends over the whole context: ``sliding_window`` only counts where
    ``use_sliding_window`` asks for it, which no release does (and whose per-layer windows
    are not implemented here)."""
    if d.get("use_sliding_window"):
        raise LayercakeError(f"{d['model_type']}: use_sliding_window = true is not supported")
    return replace(config, sliding_window=None)

"""Model configuration: frozen dataclasses built from a config.json dict (or GGUF metadata mapped
to the same keys). Each family's ``Config`` extends ``BaseConfig`` with its own fields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from layercake.errors import LayercakeError


@dataclass(frozen=True)
class BaseConfig:
    """Fields every family has; the engine (cache, runner, generate) only reads these."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @staticmethod
    def common(d: dict[str, Any], **overrides: Any) -> dict[str, Any]:
        """The ``BaseConfig`` fields read from an HF dict; ``overrides`` win over the dict."""
        heads = int(_get(d, "num_attention_heads"))
        hidden = int(_get(d, "hidden_size"))
        eos = d.get("eos_token_id")
        out = dict(
            model_type=d["model_type"],
            vocab_size=int(_get(d, "vocab_size")),
            hidden_size=hidden,
            num_hidden_layers=int(_get(d, "num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or hidden // heads),
            max_position_embeddings=int(d.get("max_position_embeddings") or 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
        )
        out.update(overrides)
        return out

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> BaseConfig:
        """Build from a config.json dict; families override to read their own fields."""
        return cls(**cls.common(d))


def _get(d: dict[str, Any], key: str) -> Any:
    if d.get(key) is None:
        raise LayercakeError(f"config.json has no {key!r}: is this a causal language model config?")
    return d[key]


def rope_parameters(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling dict or None) from either the transformers<5 fields (``rope_theta``,
    ``rope_scaling``) or the transformers>=5 ``rope_parameters`` dict."""
    params = dict(d.get("rope_parameters") or {})
    scaling = d.get("rope_scaling") or params
    theta = float(params.get("rope_theta") or d.get("rope_theta") or 10000.0)
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    if kind == "default":
        return theta, None
    if kind not in ("linear", "llama3"):
        raise LayercakeError(f"unsupported rope scaling type {kind!r}; supported: linear, llama3")
    return theta, {**scaling, "rope_type": kind}


def load_config(d: dict[str, Any]) -> BaseConfig:
    """The family config for an HF config dict (dispatch on ``model_type``)."""
    from layercake.models import family

    if "model_type" not in d:
        raise LayercakeError("config.json has no 'model_type'")
    return family(d["model_type"]).Config.from_hf(d)

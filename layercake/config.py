"""Model configuration: frozen dataclasses built from a config.json dict (or GGUF metadata mapped
to the same keys). Each family's ``Config`` extends ``BaseConfig`` with its own fields."""

from __future__ import annotations

import math
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


def load_config(d: dict[str, Any], source: str = "the model's config") -> BaseConfig:
    """The family config for an HF config dict (dispatch on ``model_type``). Every value is
    checked first (``check_config``), so a wrong one is one error naming ``source`` and the key,
    before anything is sized by it."""
    from layercake.models import family

    check_config(d, source)
    for key in ("model_type", "vocab_size", "num_hidden_layers", "num_attention_heads"):
        if d.get(key) is None:
            raise LayercakeError(f"{source} has no {key!r}: is this a causal language model?")
    fam = family(d["model_type"])
    try:
        config = fam.Config.from_hf(d)
    except KeyError as e:
        raise LayercakeError(
            f"{source} has no {e.args[0]!r}, which {d['model_type']} needs"
        ) from None
    except (TypeError, ValueError, ArithmeticError) as e:
        raise LayercakeError(f"{source}: not a valid {d['model_type']} config ({e})") from None
    _check_built(config, source)
    return config


# Bounds on sizes: far above any released model, low enough that a model built from them on the
# meta device (one module per layer, tables per head) is built in bounded time and memory.
MAX_LAYERS = 4096
MAX_HEADS = 4096
MAX_WIDTH = 2**20  # hidden, intermediate and head widths
MAX_VOCAB = 2**24
MAX_CONTEXT = 2**27
MAX_TOKEN_ID = 2**31 - 1
MAX_EXPERTS = 4096

_INTS: dict[str, tuple[int, int]] = {
    "vocab_size": (1, MAX_VOCAB),
    "hidden_size": (1, MAX_WIDTH),
    "n_embed": (1, MAX_WIDTH),
    "num_hidden_layers": (1, MAX_LAYERS),
    "num_attention_heads": (1, MAX_HEADS),
    "num_key_value_heads": (1, MAX_HEADS),
    "num_kv_heads": (1, MAX_HEADS),
    "head_dim": (1, MAX_WIDTH),
    "intermediate_size": (1, MAX_WIDTH),
    "ffn_dim": (1, MAX_WIDTH),
    "ffn_hidden_size": (1, MAX_WIDTH),
    "word_embed_proj_dim": (1, MAX_WIDTH),
    "max_position_embeddings": (1, MAX_CONTEXT),
    "sliding_window": (0, MAX_CONTEXT),  # Qwen-MoE configs write 0 for none
    "num_experts": (0, MAX_EXPERTS),
    "num_local_experts": (0, MAX_EXPERTS),
    "num_experts_per_tok": (1, MAX_EXPERTS),
    "moe_intermediate_size": (1, MAX_WIDTH),
    "shared_expert_intermediate_size": (0, MAX_WIDTH),
    "decoder_sparse_step": (1, MAX_LAYERS),
    "num_ln_in_parallel_attn": (1, 2),
    "bos_token_id": (0, MAX_TOKEN_ID),
}
_FLOATS: dict[str, tuple[float, float]] = {  # open below, closed above
    "rms_norm_eps": (0.0, 1.0),
    "layer_norm_epsilon": (0.0, 1.0),
    "layer_norm_eps": (0.0, 1.0),
    "rope_theta": (0.0, 1e12),
}
_BOOLS = (
    "tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window", "alibi", "bias",
    "new_decoder_architecture", "multi_query", "parallel_attn", "do_layer_norm_before",
    "enable_bias", "layer_norm_elementwise_affine", "_remove_final_layer_norm", "norm_topk_prob",
    "qkv_bias",
)  # fmt: skip
_STRINGS = ("model_type", "hidden_act", "activation", "activation_function")


def check_config(d: Any, source: str, names: dict[str, str] | None = None) -> None:
    """Check the type, sign and range of every config value layercake reads (absent or null
    values are left to the defaults). ``names`` maps a key to how ``source`` calls it (a GGUF
    metadata key), for the message."""

    def bad(key: str, value: Any, want: str) -> LayercakeError:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        name = f"{names[key]} ({key})" if names and key in names else key
        return LayercakeError(f"{source}: {name} = {shown} is invalid: {want}")

    if not isinstance(d, dict):
        raise LayercakeError(f"{source}: not a JSON object but {type(d).__name__}")
    for key, (lo, hi) in _INTS.items():
        v = d.get(key)
        if v is not None and (type(v) is not int or not lo <= v <= hi):
            raise bad(key, v, f"must be a whole number from {lo} to {hi}")
    for key, (lo, hi) in _FLOATS.items():
        v = d.get(key)
        if v is not None and (not _is_number(v) or not lo < v <= hi):
            raise bad(key, v, f"must be a number above {lo:g} and at most {hi:g}")
    for key in _BOOLS:
        if d.get(key) is not None and type(d[key]) is not bool:
            raise bad(key, d[key], "must be true or false")
    for key in _STRINGS:
        if d.get(key) is not None and type(d[key]) is not str:
            raise bad(key, d[key], "must be a string")
    from layercake.models import FAMILIES  # a plain table: importing it loads no model code

    if isinstance(d.get("model_type"), str) and d["model_type"] not in FAMILIES:
        raise bad("model_type", d["model_type"], f"supported: {', '.join(sorted(FAMILIES))}")
    eos = d.get("eos_token_id")
    eos_list = eos if isinstance(eos, list) else [eos] if eos is not None else []
    if len(eos_list) > 1024 or any(
        type(i) is not int or not 0 <= i <= MAX_TOKEN_ID for i in eos_list
    ):
        raise bad("eos_token_id", eos, "must be a token id or a list of token ids")
    only = d.get("mlp_only_layers")
    if only is not None and (
        not isinstance(only, list) or any(type(i) is not int or i < 0 for i in only)
    ):
        raise bad("mlp_only_layers", only, "must be a list of layer indices")
    _check_shapes(d, bad)
    for key in ("rope_scaling", "rope_parameters"):
        if d.get(key) is not None:
            _check_rope(d[key], lambda k, v, w, key=key: bad(f"{key}.{k}", v, w))


def _check_shapes(d: dict[str, Any], bad: Any) -> None:
    """Sizes that must agree with each other (where the config states them)."""
    heads, hidden = d.get("num_attention_heads"), d.get("hidden_size") or d.get("n_embed")
    if heads and hidden and d.get("head_dim") is None and hidden % heads:
        raise bad("hidden_size", hidden, f"must be a multiple of num_attention_heads ({heads})")
    kv = d.get("num_key_value_heads")
    if heads and kv and heads % kv:
        raise bad("num_key_value_heads", kv, f"must divide num_attention_heads ({heads})")
    head_dim = d.get("head_dim") or (hidden // heads if heads and hidden else None)
    if head_dim and head_dim % 2 and d.get("model_type") != "opt":
        raise bad("head_dim", head_dim, "must be even (rotary embeddings rotate pairs of values)")


def _check_rope(r: Any, bad: Any) -> None:
    if not isinstance(r, dict):
        raise bad("", r, "must be a JSON object")
    for key in ("factor", "low_freq_factor", "high_freq_factor", "rope_theta"):
        v = r.get(key)
        if v is not None and (not _is_number(v) or not 0 < v <= 1e12):
            raise bad(key, v, "must be a positive number")
    old = r.get("original_max_position_embeddings")
    if old is not None and (type(old) is not int or not 1 <= old <= MAX_CONTEXT):
        raise bad("original_max_position_embeddings", old, f"must be from 1 to {MAX_CONTEXT}")
    kind = r.get("rope_type", r.get("type"))
    if kind is not None and type(kind) is not str:
        raise bad("rope_type", kind, "must be a string")
    if kind == "llama3":
        for key in ("factor", "low_freq_factor", "high_freq_factor"):
            if r.get(key) is None:
                raise bad(key, None, "llama3 rope scaling needs it")
        if r.get("original_max_position_embeddings") is None:
            raise bad("original_max_position_embeddings", None, "llama3 rope scaling needs it")
        if r["high_freq_factor"] <= r["low_freq_factor"]:
            raise bad("high_freq_factor", r["high_freq_factor"], "must exceed low_freq_factor")
    if kind == "linear" and r.get("factor") is None:
        raise bad("factor", None, "linear rope scaling needs it")


def _check_built(c: BaseConfig, source: str) -> None:
    """What the family computed from the dict (defaults, derived widths) is usable."""
    if not 1 <= c.head_dim <= MAX_WIDTH:
        raise LayercakeError(f"{source}: the head width comes out as {c.head_dim}")
    if c.num_attention_heads % c.num_key_value_heads:
        raise LayercakeError(
            f"{source}: {c.num_key_value_heads} key/value heads do not divide "
            f"{c.num_attention_heads} attention heads"
        )
    if hasattr(c, "rope_theta") and c.head_dim % 2:
        raise LayercakeError(
            f"{source}: head_dim {c.head_dim} is odd; rotary embeddings rotate pairs of values"
        )


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

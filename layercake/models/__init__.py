"""Registry of model families: HF ``model_type`` -> the module that implements it."""

from __future__ import annotations

from types import ModuleType

from layercake.errors import LayercakeError

# model_type -> module name under layercake.models (imported lazily: a user pays only for what runs)
FAMILIES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "opt": "opt",
    "falcon": "falcon",
    "qwen3": "qwen3",
    "mixtral": "sparse",
    "qwen2_moe": "sparse",
    "qwen3_moe": "sparse",
    "olmoe": "sparse",
}


def family(model_type: str) -> ModuleType:
    """The module for ``model_type``; it defines ``Config`` (with ``from_hf``) and ``Model``."""
    import importlib

    if model_type not in FAMILIES:
        raise LayercakeError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}"
        )
    return importlib.import_module(f"layercake.models.{FAMILIES[model_type]}")

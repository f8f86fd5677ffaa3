"""Helpers for tests that need bigger checkpoints than transformers writes quickly.

``benchmarks/`` is importable as a package because pytest puts the repository root on the path
(``pythonpath`` in pyproject.toml): no test edits the import path."""

from __future__ import annotations

from pathlib import Path

from benchmarks.checkpoints import LLAMA_1B, write_random_llama


def bf16_llama(
    path: Path, hidden: int = 64, layers: int = 3, inter: int = 128, vocab: int = 256
) -> Path:
    """A random bf16 Llama (GQA, tied embeddings, llama3 rope) in two shards."""
    cfg = dict(LLAMA_1B, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
               vocab_size=vocab, bos_token_id=1, eos_token_id=2)  # fmt: skip
    return write_random_llama(path, cfg, shards=2)

"""Shared fixtures: tiny random checkpoints written by transformers itself (the oracle)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

torch.set_num_threads(2)


def make_hf_checkpoint(path: Path, model_type: str, seed: int = 0, **cfg) -> Path:
    """Save a random-weight HF model of ``model_type`` (fp32 safetensors) into ``path``."""
    import transformers

    config = transformers.AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random init scales are tiny: widen them so mistakes show in logits
        for p in model.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 0.5).add_(1.0 if p.dim() == 1 else 0.0)
    model.save_pretrained(path, safe_serialization=True)
    return path


def hf_model(path: Path):
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return m.eval()


LLAMA_TINY = dict(
    vocab_size=97,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=12,
    max_position_embeddings=128,
)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("llama"), "llama", **LLAMA_TINY)


CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def write_word_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer (w0 .. wN, <s>, </s>, <unk>) with a chat template, so CLI and text
    paths run on tiny random checkpoints."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(vocab_size - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<s>", "</s>", "<unk>"])
    tok.save(str(path / "tokenizer.json"))
    cfg = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", chat_template=CHAT_TEMPLATE)
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="session")
def tiny_chat_llama(tmp_path_factory, tiny_llama) -> Path:
    import shutil

    d = tmp_path_factory.mktemp("chat") / "tiny-llama-chat"
    shutil.copytree(tiny_llama, d)
    write_word_tokenizer(d, LLAMA_TINY["vocab_size"])
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(app: Any) -> Iterator[str]:
    """Run the ASGI ``app`` under uvicorn on a free loopback port; yields its base URL."""
    import uvicorn

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.02)
    assert srv.started
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        t.join(timeout=10)

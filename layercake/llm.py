"""The Python API: ``layercake.load(model)`` -> ``LLM``: tokenizer, generate, logits, score."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from layercake.checkpoint import open_checkpoint
from layercake.checkpoint.locate import locate_model
from layercake.config import BaseConfig, load_config
from layercake.embedded import embedded_model_path
from layercake.errors import LayercakeError
from layercake.generate import (
    GenerationResult,
    GenerationStats,
    ScoreResult,
    StepEvent,
    generate,
    generate_stream,
    score,
)
from layercake.models.parts import parse_parts
from layercake.options import Options
from layercake.runner import Runner
from layercake.runners import build_runner
from layercake.sampling import SamplingParams
from layercake.tokenizer import Tokenizer


class LLM:
    """A loaded model: ``tokenizer``, ``generate``, ``stream``, ``logits``, ``score``."""

    def __init__(
        self, runner: Runner, tokenizer: Tokenizer | None, config: BaseConfig, path: Path
    ) -> None:
        self.runner = runner
        self._tokenizer = tokenizer
        self.config = config
        self.path = path
        self.last_stats: GenerationStats | None = None

    def close(self) -> None:
        """Release what the runner holds beyond memory (a pipeline's workers and connections)."""
        close = getattr(self.runner, "close", None)
        if callable(close):
            close()

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            raise LayercakeError(f"{self.path} has no tokenizer: pass token ids instead of text")
        return self._tokenizer

    @property
    def eos_token_ids(self) -> list[int]:
        ids = list(self._tokenizer.eos_token_ids) if self._tokenizer else []
        return ids or list(self.config.eos_token_ids)

    def _ids(self, prompt: str | Sequence[int]) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids) if self._tokenizer else ""

    def chat_prompt(self, messages: list[dict[str, Any]], allow_special: bool = False) -> list[int]:
        """Token ids of a conversation rendered by the model's chat template. Special-token text
        in the messages is encoded as plain text unless ``allow_special`` (see
        ``Tokenizer.encode_chat``)."""
        return self.tokenizer.encode_chat(messages, allow_special=allow_special)

    def _params(self, n: int, kw: dict[str, Any]) -> list[SamplingParams]:
        kw.setdefault("temperature", 0.0)  # greedy unless asked: reproducible by default
        if isinstance(kw.get("stop"), str):
            kw["stop"] = [kw["stop"]]
        try:
            p = SamplingParams(**kw)
        except TypeError as e:
            raise LayercakeError(f"invalid generation option: {e}") from None
        return [p] * n

    def generate(
        self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]], **sampling: Any
    ) -> list[GenerationResult]:
        """Complete each prompt (text or token ids). Options are ``SamplingParams`` fields:
        max_new_tokens, temperature (default 0 = greedy), top_p, top_k, min_p,
        repetition_penalty, frequency_penalty, presence_penalty, seed, stop, ignore_eos, logprobs.
        A single prompt may be passed bare; a list of results is returned either way."""
        ids = [self._ids(p) for p in _as_list(prompts)]
        params = self._params(len(ids), sampling)
        self.last_stats = stats = GenerationStats()
        block = getattr(self.runner, "block_size", None) or len(ids)
        if len(ids) <= block:
            return generate(self.runner, ids, params, self.eos_token_ids, self._decode, stats)
        # more prompts than the runner's block (its memory plan): blocks of similar lengths
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        results: list[Any] = [None] * len(ids)
        for a in range(0, len(ids), block):
            idx = order[a : a + block]
            outs = generate(
                self.runner, [ids[i] for i in idx], [params[i] for i in idx],
                self.eos_token_ids, self._decode, stats,
            )  # fmt: skip
            for i, r in zip(idx, outs):
                results[i] = r
        stats.batch_size, stats.prompt_tokens = block, sum(map(len, ids))
        return results

    def stream(
        self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]], **sampling: Any
    ) -> Iterator[StepEvent]:
        """Like ``generate`` but yields each token as it is produced (``StepEvent.text``)."""
        ids = [self._ids(p) for p in _as_list(prompts)]
        self.last_stats = GenerationStats()
        return generate_stream(
            self.runner,
            ids,
            self._params(len(ids), sampling),
            self.eos_token_ids,
            self._decode,
            self.last_stats,
        )

    def logits(self, token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Logits (B, T, vocab) fp32 for token id lists; row b's logits for its t-th token are
        at [b, t] (rows shorter than T are zero past their end)."""
        rows = [list(r) for r in token_ids]
        if not rows or not all(rows):
            raise LayercakeError("logits() needs one or more non-empty token id lists")
        T = max(map(len, rows))
        if T > self.runner.max_context:
            raise LayercakeError(
                f"{T} tokens is beyond the model's context of {self.runner.max_context}"
            )
        tokens = torch.zeros(len(rows), T, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.bool)
        for b, r in enumerate(rows):  # left-pad, then shift each row back to start at 0
            tokens[b, T - len(r) :] = torch.tensor(r)
            mask[b, T - len(r) :] = True
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        cache = self.runner.new_cache(len(rows), T)
        out = self.runner.forward(tokens, positions, cache, mask)  # (B, T, V)
        result = torch.zeros_like(out)
        for b, r in enumerate(rows):
            result[b, : len(r)] = out[b, T - len(r) :]
        return result

    def score(
        self, prompt: str | Sequence[int], continuations: Sequence[str | Sequence[int]]
    ) -> list[ScoreResult]:
        """log P(continuation | prompt) for each continuation (sum and per-token mean).

        Text continuations are tokenized without special tokens, as they follow the prompt."""
        p = self._ids(prompt)
        conts = [
            self.tokenizer.encode(c, add_special_tokens=False) if isinstance(c, str) else list(c)
            for c in continuations
        ]
        return score(self.runner, p, conts)


def _as_list(prompts: Any) -> list[Any]:
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        return [prompts]
    return list(prompts)


@contextlib.contextmanager
def _loading_allocator() -> Iterator[None]:
    """While loading, glibc serves allocations of 1 MB and more from their own mappings, which go
    back to the system when freed: loading (dequantize, pack, free, many times over) otherwise
    leaves hundreds of MB of freed heap counted in the process (1.37 GB instead of 1.09 GB peak
    for SmolLM2). Afterwards allocations below 32 MB come from the heap again, where freed
    memory is reused without page faults: fresh mappings for every activation tensor make
    elementwise ops ~10x slower."""
    libc = None
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None)
            libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        except (OSError, AttributeError):  # not glibc: nothing to tune
            libc = None
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(-3, 32 << 20)  # glibc's own ceiling for its moving threshold


def load(model: str | os.PathLike | None = None, options: Options | None = None, **kw: Any) -> LLM:
    """Load a model: a HF directory (config.json + safetensors) or a .gguf file; ``None`` is the
    embedded SmolLM2-135M-Instruct. How it runs is an ``Options`` (see its fields: part, device,
    dtype, offloading, compression, pipeline, planning), given as one or as its keywords, e.g.
    ``load(path, device="cuda", cpu_memory="1.6GB", offload_dir="/tmp/off")``.
    With ``policy="auto"`` ``llm.runner.plan`` holds the plan."""
    if options is not None and kw:
        raise LayercakeError("give load() an Options or its keywords, not both")
    o = options if options is not None else Options.of(**kw)
    path = locate_model(model) if model is not None else embedded_model_path()
    if o.threads:
        torch.set_num_threads(o.threads)
    with _loading_allocator():
        ckpt = open_checkpoint(path)
        config = load_config(ckpt.config_dict())
        tokenizer = _load_tokenizer(ckpt, path)
        if o.topology is not None:
            from layercake.pipeline.runner import pipeline_runner

            runner = pipeline_runner(o.topology, ckpt, config, path, o.dtype, o.micro_batches)
        elif o.policy == "auto":
            from layercake.offload.auto import auto_plan

            parts = parse_parts(o.parts, config.num_hidden_layers)
            plan = auto_plan(o, ckpt, config, parts)
            runner = build_runner(o, ckpt, config, path, parts, plan)
        else:
            runner = build_runner(o, ckpt, config, path)
    return LLM(runner, tokenizer, config, path)


def _load_tokenizer(ckpt: Any, path: Path) -> Tokenizer | None:
    from layercake.checkpoint.gguf import GGUFCheckpoint

    if isinstance(ckpt, GGUFCheckpoint):
        return Tokenizer.from_gguf(ckpt)
    if (path / "tokenizer.json").is_file():
        return Tokenizer.from_dir(path)
    return None

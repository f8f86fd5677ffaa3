"""Every model family against transformers (fp32): prefill, cached decode, left-padded batches with
greedy continuations, and slices chained in a LocalRunner. Tiny random checkpoints, odd shapes
(head_dim 12, fewer KV heads than query heads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import LLAMA_TINY, hf_model, make_hf_checkpoint

from layercake.checkpoint import open_checkpoint
from layercake.config import load_config
from layercake.errors import LayercakeError
from layercake.models.build import build_slice
from layercake.runner import LocalRunner

TOL = 1e-4
VOCAB = 97

OPT_TINY = dict(
    vocab_size=VOCAB,
    hidden_size=48,
    ffn_dim=80,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=64,
)
FALCON_TINY = dict(
    vocab_size=VOCAB,
    hidden_size=48,
    ffn_hidden_size=80,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=64,
)
LINEAR_ROPE = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}

# case id -> (model_type, config overrides); every case has 3 layers
CASES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", LLAMA_TINY),
    "llama-tied": ("llama", {**LLAMA_TINY, "tie_word_embeddings": True}),
    "llama-rope-llama3": (
        "llama",
        {
            **LLAMA_TINY,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8,
            },
        },
    ),
    "llama-rope-linear": ("llama", {**LLAMA_TINY, "rope_parameters": LINEAR_ROPE}),
    # the window (4) is shorter than the test sequences, so it changes the logits
    "mistral-window": ("mistral", {**LLAMA_TINY, "sliding_window": 4}),
    "qwen2-bias": ("qwen2", {k: v for k, v in LLAMA_TINY.items() if k != "head_dim"}),
    "opt-pre-ln": ("opt", OPT_TINY),
    "opt-post-ln-proj": (
        "opt",
        {**OPT_TINY, "do_layer_norm_before": False, "word_embed_proj_dim": 32},
    ),
    "opt-nobias-noaffine-gelu": (
        "opt",
        {
            **OPT_TINY,
            "enable_bias": False,
            "layer_norm_elementwise_affine": False,
            "activation_function": "gelu",
        },
    ),
    "falcon-7b-mq": ("falcon", {**FALCON_TINY, "multi_query": True, "parallel_attn": True}),
    "falcon-40b-gqa-2ln": (
        "falcon",
        {**FALCON_TINY, "new_decoder_architecture": True, "num_kv_heads": 2, "bias": True},
    ),
    "falcon-40b-gqa-1ln": (
        "falcon",
        {
            **FALCON_TINY,
            "new_decoder_architecture": True,
            "num_kv_heads": 2,
            "num_ln_in_parallel_attn": 1,
            "rope_parameters": LINEAR_ROPE,
        },
    ),
    "falcon-sequential": (
        "falcon",
        {
            **FALCON_TINY,
            "multi_query": False,
            "parallel_attn": False,
            "bias": True,
            "rope_parameters": LINEAR_ROPE,
        },
    ),
}


class Case:
    """One family case: its checkpoint, the transformers model and helpers to build runners."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ckpt = open_checkpoint(path)
        self.config = load_config(self.ckpt.config_dict())
        self.hf = hf_model(path)
        # greedy continuations of fixed length: never stop early on an EOS token
        self.hf.generation_config.eos_token_id = None
        self.runner = self.runner_for("f")

    def runner_for(self, *specs: str) -> LocalRunner:
        slices = [build_slice(self.ckpt, s, config=self.config) for s in specs]
        return LocalRunner(slices, self.config)

    @torch.no_grad()
    def hf_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.hf(tokens).logits  # (B, T, vocab)


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def case(request, tmp_path_factory) -> Case:
    model_type, cfg = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    return Case(make_hf_checkpoint(path, model_type, **cfg))


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def positions(batch: int, start: int, end: int) -> torch.Tensor:
    return torch.arange(start, end).expand(batch, end - start)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_prefill_matches_transformers(case: Case) -> None:
    toks = tokens(2, 11)
    cache = case.runner.new_cache(2, 16)
    out = case.runner.forward(toks, positions(2, 0, 11), cache)
    assert max_diff(out, case.hf_logits(toks)) < TOL


def test_cached_decode_matches_transformers(case: Case) -> None:
    toks = tokens(2, 12, seed=2)
    ref = case.hf_logits(toks)
    cache = case.runner.new_cache(2, 12)
    outs = [case.runner.forward(toks[:, :5], positions(2, 0, 5), cache)]
    for t in range(5, 12):
        outs.append(case.runner.forward(toks[:, t : t + 1], positions(2, t, t + 1), cache))
    assert cache.length == 12
    assert max_diff(torch.cat(outs, dim=1), ref) < TOL


def test_left_padded_batch(case: Case) -> None:
    """Rows of a left-padded batch equal each row alone, and greedy decoding equals HF's."""
    lengths, steps = [7, 3, 5], 8
    prompts = [tokens(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    B, T = len(prompts), max(lengths)
    toks = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool)
    pos = torch.zeros(B, T, dtype=torch.long)  # padding slots keep position 0
    for b, p in enumerate(prompts):
        n = len(p)
        toks[b, T - n :], mask[b, T - n :], pos[b, T - n :] = p, True, torch.arange(n)
    cache = case.runner.new_cache(B, T + steps)
    logits = case.runner.forward(toks, pos, cache, token_mask=mask)  # (B, T, vocab)

    for b, p in enumerate(prompts):
        n = len(p)
        alone = case.runner.forward(p[None], positions(1, 0, n), case.runner.new_cache(1, n))
        assert max_diff(logits[b, T - n :], alone[0]) < TOL, f"row {b} differs from alone"
        assert max_diff(logits[b, T - n :], case.hf_logits(p[None])[0]) < TOL

    generated = [logits[:, -1].argmax(-1)]  # (B,)
    next_pos = torch.tensor(lengths)
    for _ in range(steps - 1):
        step = case.runner.forward(generated[-1][:, None], next_pos[:, None], cache)
        generated.append(step[:, -1].argmax(-1))
        next_pos = next_pos + 1
    ours = torch.stack(generated, dim=1)  # (B, steps)
    for b, p in enumerate(prompts):
        ref = case.hf.generate(p[None], do_sample=False, max_new_tokens=steps, pad_token_id=0)
        assert ours[b].tolist() == ref[0, len(p) :].tolist(), f"row {b} greedy continuation"


@pytest.mark.parametrize(
    "specs",
    [("b 0-1", "1-2", "2-3 e"), ("b 0-1 2-3 e", "1-2"), ("b", "0-3", "e")],
    ids=["chain", "non-contiguous", "embed-and-head-alone"],
)
def test_slices_equal_full_model(case: Case, specs: tuple[str, ...]) -> None:
    runner = case.runner_for(*specs)
    toks = tokens(2, 9, seed=3)
    full_cache, cache = case.runner.new_cache(2, 10), runner.new_cache(2, 10)
    for lo, hi in ((0, 8), (8, 9)):  # prefill, then one cached decode step
        want = case.runner.forward(toks[:, lo:hi], positions(2, lo, hi), full_cache)
        got = runner.forward(toks[:, lo:hi], positions(2, lo, hi), cache)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_falcon_alibi_is_refused() -> None:
    d = {"model_type": "falcon", "alibi": True, "multi_query": False, **FALCON_TINY}
    with pytest.raises(LayercakeError, match="not supported"):
        load_config(d)

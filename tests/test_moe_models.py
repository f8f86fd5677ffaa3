"""Qwen3 and the mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) against
transformers (fp32): prefill logits, cached decode with 12 greedy tokens, slices, on tiny random
checkpoints saved by transformers itself, per-expert (as published) and stacked
(``save_original_format=False``, what transformers 5 holds in memory)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import hf_model, make_hf_checkpoint
from test_families import Case, positions, tokens

from layercake.config import load_config
from layercake.errors import LayercakeError
from layercake.models.moe import SparseMoE
from layercake.runner import LocalRunner

TOL = 1e-3
VOCAB = 97
STEPS = 12
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            bos_token_id=None, eos_token_id=None, pad_token_id=None)  # fmt: skip
QWEN_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24)

# case id -> (model_type, config, stacked experts)
CASES: dict[str, tuple[str, dict, bool]] = {
    "qwen3": ("qwen3", dict(BASE, head_dim=16), False),
    "mixtral": ("mixtral", dict(BASE, num_local_experts=8, num_experts_per_tok=2), False),
    "mixtral-stacked": ("mixtral", dict(BASE, num_local_experts=6, num_experts_per_tok=3), True),
    "qwen2_moe": (
        "qwen2_moe",
        dict(
            BASE,
            **QWEN_MOE,
            shared_expert_intermediate_size=40,
            num_hidden_layers=3,
            mlp_only_layers=[1],
        ),  # fmt: skip
        False,
    ),
    "qwen2_moe-stacked": (
        "qwen2_moe",
        dict(BASE, **QWEN_MOE, shared_expert_intermediate_size=40),
        True,
    ),
    "qwen3_moe": ("qwen3_moe", dict(BASE, **QWEN_MOE, head_dim=16, norm_topk_prob=True), False),
    "qwen3_moe-stacked": ("qwen3_moe", dict(BASE, **QWEN_MOE, head_dim=16), True),
    "olmoe": ("olmoe", dict(BASE, num_experts=8, num_experts_per_tok=2), False),
    "olmoe-stacked": ("olmoe", dict(BASE, num_experts=4, num_experts_per_tok=2), True),
}


def save_tiny(path: Path, model_type: str, cfg: dict, stacked: bool) -> Path:
    make_hf_checkpoint(path, model_type, **cfg)
    if stacked:  # the same weights, saved as transformers 5 holds them
        hf_model(path).save_pretrained(path, save_original_format=False)
    return path


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def case(request, tmp_path_factory) -> Case:
    model_type, cfg, stacked = CASES[request.param]
    return Case(save_tiny(tmp_path_factory.mktemp(request.param), model_type, cfg, stacked))


def greedy(runner: LocalRunner, prompt: torch.Tensor, steps: int) -> tuple[list, torch.Tensor]:
    """Greedy tokens (B, steps) and the logits of every step (B, T + steps - 1, vocab)."""
    B, T = prompt.shape
    cache = runner.new_cache(B, T + steps)
    logits = [runner.forward(prompt, positions(B, 0, T), cache)]
    out = [logits[-1][:, -1].argmax(-1)]
    for t in range(T, T + steps - 1):
        logits.append(runner.forward(out[-1][:, None], positions(B, t, t + 1), cache))
        out.append(logits[-1][:, -1].argmax(-1))
    return torch.stack(out, dim=1), torch.cat(logits, dim=1)


def test_layers_hold_experts(case: Case) -> None:
    moe = [m for m in case.runner.slices[0].modules() if isinstance(m, SparseMoE)]
    c = case.config
    want = 0 if c.model_type == "qwen3" else c.num_hidden_layers - len(c.dense_layers)
    assert len(moe) == want


def test_prefill_matches_transformers(case: Case) -> None:
    toks = tokens(3, 9)
    out = case.runner.forward(toks, positions(3, 0, 9), case.runner.new_cache(3, 9))
    with torch.no_grad():
        ref = case.hf(toks).logits
    assert ref.std() > 0.5  # not degenerate: the layers decide the logits
    assert (out - ref).abs().max().item() < TOL


def test_greedy_decode_matches_transformers(case: Case) -> None:
    prompt = tokens(2, 6, seed=2)
    ours, logits = greedy(case.runner, prompt, STEPS)
    with torch.no_grad():
        ref = case.hf.generate(prompt, do_sample=False, max_new_tokens=STEPS, min_new_tokens=STEPS,
                               pad_token_id=0)  # fmt: skip
        ref_logits = case.hf(ref[:, :-1]).logits
    assert ours.tolist() == ref[:, 6:].tolist()
    assert (logits - ref_logits).abs().max().item() < TOL


def test_slices_equal_full_model(case: Case) -> None:
    last = case.config.num_hidden_layers
    runner = case.runner_for("b 0-1", f"1-{last} e")
    toks = tokens(2, 9, seed=3)
    full_cache, cache = case.runner.new_cache(2, 10), runner.new_cache(2, 10)
    for lo, hi in ((0, 8), (8, 9)):
        want = case.runner.forward(toks[:, lo:hi], positions(2, lo, hi), full_cache)
        got = runner.forward(toks[:, lo:hi], positions(2, lo, hi), cache)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_bad_moe_config_is_one_error() -> None:
    d = dict(BASE, model_type="mixtral", num_local_experts=2, num_experts_per_tok=3)
    with pytest.raises(LayercakeError, match="num_experts_per_tok"):
        load_config(d)
    with pytest.raises(LayercakeError, match="clip_qkv"):
        load_config(dict(BASE, model_type="olmoe", num_experts=4, num_experts_per_tok=2,
                         clip_qkv=8.0))  # fmt: skip

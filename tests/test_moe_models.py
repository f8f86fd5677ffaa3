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
from layercake.ops.linear import form_of
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


# ---- every path: pipeline, split, compression, compiled one-token steps ----------------------


@pytest.fixture(scope="module")
def mixtral_stacked(tmp_path_factory) -> Path:
    model_type, cfg, _ = CASES["mixtral-stacked"]
    cfg = dict(cfg, num_hidden_layers=3, hidden_size=64, intermediate_size=64)  # int blocks
    return save_tiny(tmp_path_factory.mktemp("mixtral3"), model_type, cfg, True)


def test_two_process_pipeline_equals_single_process(tmp_path, mixtral_stacked) -> None:
    from test_pipeline import PROMPTS, job, log_of, topology, workers

    import layercake

    want = layercake.load(mixtral_stacked).generate(PROMPTS, max_new_tokens=6, ignore_eos=True)
    topo = topology(tmp_path, ["b 0-2", "2-3 e"], micro_batches=2)
    with workers(topo, mixtral_stacked, ["pc2"], "--once") as procs:
        with job(mixtral_stacked, topo) as llm:
            out = llm.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)
        assert procs[0].wait(20) == 0, log_of(procs[0])
    assert [o.token_ids for o in out] == [o.token_ids for o in want]


def test_split_writes_each_nodes_experts(tmp_path, mixtral_stacked) -> None:
    """A stacked checkpoint split per node: each node's file holds its layers' experts, one
    tensor each, and its slice computes what the whole model's does."""
    from test_pipeline import topology

    from layercake.checkpoint import open_checkpoint
    from layercake.cli import main
    from layercake.models.build import build_slice

    topo = topology(tmp_path, ["b 0-1", "1-3 e"])
    assert main(["split", "--model", str(mixtral_stacked), "--topology", str(topo),
                 "--out", str(tmp_path / "parts")]) == 0  # fmt: skip
    b = open_checkpoint(tmp_path / "parts/pc2")
    assert "model.layers.2.mlp.experts.5.down_proj.weight" in b.weight_map  # stored per expert
    assert not any(".layers.0." in n for n in b.tensor_names())
    full = Case(mixtral_stacked)
    cfg = full.config
    a = open_checkpoint(tmp_path / "parts/main")
    runner = LocalRunner([build_slice(a, "b 0-1", config=cfg), build_slice(b, "1-3 e", config=cfg)],
                         cfg)  # fmt: skip
    toks = tokens(1, 7)
    want = full.runner.forward(toks, positions(1, 0, 7), full.runner.new_cache(1, 7))
    assert torch.equal(runner.forward(toks, positions(1, 0, 7), runner.new_cache(1, 7)), want)


@pytest.mark.parametrize("bits", [8, 4])
def test_compressed_experts(mixtral_stacked, bits: int) -> None:
    """--compress-weight: experts held quantized (their own linears), routers kept dense."""
    from layercake.options import Options
    from layercake.runners import build_runner

    full = Case(mixtral_stacked)
    o = Options.of(compress_weight=True, compress_bits=bits, group_size=32)
    r = build_runner(o, full.ckpt, full.config, mixtral_stacked)
    moe = [m for m in r.slices[0].modules() if isinstance(m, SparseMoE)]
    assert all(type(m.gate.weight) is torch.nn.Parameter for m in moe)  # dense fp32 router
    assert all(form_of(e.gate_up_proj) == "blocks" for m in moe for e in m.experts)
    toks = tokens(3, 9)
    ref = full.runner.forward(toks, positions(3, 0, 9), full.runner.new_cache(3, 9))
    out = r.forward(toks, positions(3, 0, 9), r.new_cache(3, 9))
    assert (out - ref).norm() / ref.norm() < (0.15 if bits == 8 else 0.8)


@pytest.mark.slow
def test_compiled_one_token_steps(case: Case) -> None:
    """--compile: one-token steps run as one graph (experts through one opaque op), equal to
    eager."""
    from layercake.models.build import build_slice

    c = case.config
    compiled = LocalRunner([build_slice(case.ckpt, "f", config=c, compiled=True)], c,
                           compile_step=True)  # fmt: skip
    prompt = tokens(2, 6, seed=7)
    want, want_logits = greedy(case.runner, prompt, STEPS)
    got, got_logits = greedy(compiled, prompt, STEPS)
    assert got.tolist() == want.tolist()
    assert (got_logits - want_logits).abs().max().item() < 1e-4

"""Where a pipeline node's memory goes: activations planned for the prompt pieces a node is sent
(not whole prompts), logits only where the head is, the memory plan each node reports, and an
offloaded prompt's bf16 weights widened for MKL slab by slab (the slab counted in the plan)."""

from __future__ import annotations

import json

import pytest
import torch
from test_pipeline import llama5, topology  # noqa: F401  (a fixture)
from tests_helpers import bf16_llama

import layercake
import layercake.offload.footprint as off
from layercake.checkpoint import open_checkpoint
from layercake.config import load_config
from layercake.models.parts import parse_parts
from layercake.offload.policy import STAGING_SLOTS
from layercake.ops import kernels
from layercake.ops import linear as ops


def test_activations_planned_for_the_pass_and_logits_where_the_head_is(llama5):  # noqa: F811
    ckpt = open_checkpoint(llama5)
    cfg = load_config(ckpt.config_dict())

    def act(spec: str, **kw) -> int:
        parts = parse_parts(spec, cfg.num_hidden_layers)
        return off.footprint(ckpt, cfg, parts, torch.float32, 8, 1, 64, **kw).activations

    whole, piece = act("b 0-2"), act("b 0-2", pass_tokens=16)
    assert whole == 4 * piece  # intermediates and hidden states scale with the pass's tokens
    assert act("2-5 e") - act("2-4") == 4 * 8 * cfg.vocab_size  # the logits of a step
    assert act("b 0-2", pass_tokens=1000) == whole  # never more than the context


def test_node_plans_for_prompt_pieces_and_reports_its_memory(tmp_path, monkeypatch):
    """An offloaded node's runner plans its activations for ceil(context / chunks) tokens a
    pass, its plan (bytes held, what streams) is in the stage's report, and within its budget."""
    from layercake.pipeline.stage import Stage
    from layercake.pipeline.topology import load_topology

    monkeypatch.setattr(off, "process_rss", lambda: 0)  # a budget that streams, whatever the
    monkeypatch.setattr(off, "SAFETY", 0)  # process holds
    path = bf16_llama(tmp_path / "m", hidden=128, inter=256, vocab=512, layers=8)
    ckpt = open_checkpoint(path)
    cfg = load_config(ckpt.config_dict())
    fp = off.footprint(ckpt, cfg, parse_parts("b 0-6", 8), torch.float32, 4, 1, 40,
                       pass_tokens=10)  # fmt: skip
    # three staging slots of a layer are half of these six layers: with 3/4 of their bytes
    # beside the fixed costs, half of each layer streams
    assert STAGING_SLOTS * fp.max_unit * 2 == fp.weights
    budget = fp.activations + fp.work + fp.kv + fp.weights * 3 // 4 + STAGING_SLOTS * fp.align
    node = {"cpu_memory": budget, "offload_dir": str(tmp_path / "off"), "batch_size": 4,
            "num_batches": 1, "max_context": 40}  # fmt: skip
    topo = load_topology(topology(tmp_path, ["b 0-6", "6-8 e"], options={"main": node},
                                  prefill_chunks=4), 8)  # fmt: skip
    stage = Stage(topo, 0, ckpt, cfg, path)
    runner = stage.runners[0]
    assert runner.pass_tokens == 10  # 40 tokens in 4 pieces
    mem = stage.report()["memory"]["0"]
    assert 0.4 < runner.disk_bytes / sum(u.nbytes for u in runner.units) < 0.6
    assert mem["streamed"] == round(runner.disk_bytes / 1e6, 1) and mem["staging"] > 0
    assert sum(runner.memory.values()) <= budget
    json.dumps(mem)  # logged by the worker as JSON


def test_widened_row_blocks_equal_one_tensor(monkeypatch):
    """A weight in row blocks (an offloaded weight's tiers) widens block by block into the same
    output as the whole tensor, across slab boundaries inside a block."""
    monkeypatch.setattr(ops, "WIDEN_SLAB", 64 * 30)  # 30 rows a slab
    monkeypatch.setattr(ops, "_slabs", ops.threading.local())
    g = torch.Generator().manual_seed(5)
    w = torch.randn(100, 64, generator=g).to(torch.bfloat16)
    b = torch.randn(100, generator=g)
    x = torch.randn(300, 64, generator=g)
    want = ops._widened(x, w, b)
    torch.testing.assert_close(ops._widened(x, [w[:45], w[45:70], w[70:]], b), want)
    torch.testing.assert_close(want, x @ w.float().T + b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not kernels.available(), reason="bf16 as stored needs the CPU kernels")
def test_offloaded_prompt_widens_bf16_weights_and_equals_memory(tmp_path, monkeypatch):
    """A prompt of >= WIDEN_ROWS rows through an offloaded bf16 model (rows in RAM and on disk)
    takes the widened path (where AMX is absent) and gives the in-memory logits."""
    monkeypatch.setattr(kernels, "_AMX", [False])
    path = bf16_llama(tmp_path / "m", hidden=128, inter=256, vocab=512)
    prompts = [[(7 * i + 3 * j) % 500 + 3 for j in range(40)] for i in range(8)]  # 320 rows
    want = layercake.load(path).logits(prompts)
    calls = []
    widened = ops._widened
    monkeypatch.setattr(ops, "_widened", lambda *a: calls.append(len(a[0])) or widened(*a))
    llm = layercake.load(path, percent=(0, 40, 100, 0, 100, 0), offload_dir=tmp_path / "off",
                         batch_size=8, max_context=48)  # fmt: skip
    got = llm.logits(prompts)
    assert calls and llm.runner.bytes_read > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not kernels.available(), reason="bf16 as stored needs the CPU kernels")
def test_plan_counts_the_widening_slab_only_where_prompts_widen(tmp_path, monkeypatch):
    """The fp32 slab a prompt's bf16 weights widen into is planned only without AMX: on the
    tiles nothing widens (an offloaded prompt never calls ``_widened``), and the slab's bytes
    are left to the weights."""
    path = bf16_llama(tmp_path / "m", hidden=128, inter=256, vocab=512)
    ckpt = open_checkpoint(path)
    cfg = load_config(ckpt.config_dict())
    parts = parse_parts("b 0-2", cfg.num_hidden_layers)

    def scratch(amx: bool) -> int:
        monkeypatch.setattr(kernels, "_AMX", [amx])
        return off.footprint(ckpt, cfg, parts, torch.float32, 4, 1, 40).scratch

    assert scratch(False) - scratch(True) == off.WIDEN_BYTES
    monkeypatch.setattr(kernels, "_AMX", [])  # the machine's own answer
    if not kernels.amx():
        pytest.skip("the rest needs a CPU with AMX-BF16")
    calls = []
    monkeypatch.setattr(ops, "_widened", lambda *a: calls.append(1))
    prompts = [[(7 * i + 3 * j) % 500 + 3 for j in range(40)] for i in range(8)]  # 320 rows
    llm = layercake.load(path, percent=(0, 40, 100, 0, 100, 0), offload_dir=tmp_path / "off",
                         batch_size=8, max_context=48)  # fmt: skip
    llm.logits(prompts)
    assert not calls and llm.runner.bytes_read > 0


def test_a_model_on_the_meta_device_imports_no_compiler():
    """Building a slice on the meta device (every offloaded runner and plan does) must not pull
    in torch._dynamo and sympy (~70 MB a process that a node's plan would lose to its weights)."""
    import subprocess
    import sys

    code = ("import sys, torch\nfrom layercake.models.layers import Embedding\n"
            "with torch.device('meta'):\n    Embedding(100, 8)\n"
            "print('torch._dynamo' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]

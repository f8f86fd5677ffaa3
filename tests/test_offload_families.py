"""The offload executor runs every family's own head (``final_norm``, then the projection in
vocabulary slabs): offloaded logits equal in-memory ones for OPT (with a ``project_out`` to a
narrower head) and Falcon, the head streamed from disk."""

from __future__ import annotations

import pytest
import torch
from conftest import make_hf_checkpoint
from test_families import FALCON_TINY, OPT_TINY

import layercake

CASES = {
    "opt-project-out": ("opt", {**OPT_TINY, "word_embed_proj_dim": 32}),
    "falcon": ("falcon", FALCON_TINY),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_offloaded_head_matches_in_memory(case, tmp_path):
    model_type, cfg = CASES[case]
    path = make_hf_checkpoint(tmp_path / "m", model_type, **cfg)
    ids = [[3, 14, 15, 92, 65], [35, 89, 79]]
    want = layercake.load(path).logits(ids)
    llm = layercake.load(path, percent=(0, 0, 100, 0, 100, 0), offload_dir=tmp_path / "off")
    assert llm.runner.bytes_read == 0  # nothing read before the forward
    got = llm.logits(ids)
    assert llm.runner.bytes_read > 0  # the layers and the head came from disk
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()

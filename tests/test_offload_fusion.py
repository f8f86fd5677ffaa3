"""Fused linears on the offload path: q/k/v and gate/up of a streamed layer are one weight each,
in the order the family names them, in every form a streamed weight takes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import layercake
from layercake.ops import kernels
from layercake.ops.linear import Linear

FUSED = {"self_attn": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
         "mlp": ("gate_up_proj", ("gate_proj", "up_proj"))}  # fmt: skip


def _members_out(ref: nn.Module, parent: str, members: tuple[str, ...], x: torch.Tensor):
    """The in-memory model's output of the members, side by side (q | k | v, gate | up)."""
    owner = ref.get_submodule(parent)
    fused = getattr(owner, FUSED[parent.rpartition(".")[2]][0], None)
    if fused is not None:
        return fused(x)
    return torch.cat([getattr(owner, m)(x) for m in members], dim=-1)


@pytest.mark.parametrize(
    "kw,form",
    [
        ({}, "bf16"),  # bf16 rows multiplied where they lie
        (dict(dtype="bf16"), "dense"),  # converted into the scratch
        (dict(compress_weight=True, group_size=32), "int4pack"),
        (dict(compress_weight=True, group_size=16), "dequant"),
    ],
)
def test_streamed_layers_are_fused_in_order(tmp_path, kw, form):
    """Each streamed layer holds 4 linears (qkv, o, gate_up, down), and the fused ones give the
    members' outputs in order: a fusion that put k before q (or up before gate) fails here."""
    from tests_helpers import bf16_llama

    if form == "bf16" and not kernels.available():
        pytest.skip("no bf16 kernel here")
    path = bf16_llama(tmp_path / "m", hidden=128, inter=256, vocab=320)
    ref = layercake.load(path, exact=True, **kw).runner.slices[0]
    llm = layercake.load(path, percent=(20, 30, 100, 0, 100, 0), offload_dir=tmp_path / "off",
                         batch_size=2, **kw)  # fmt: skip
    r = llm.runner
    for j, u in enumerate(r.units):
        if u.kind != "layer":
            continue
        fused = [e for e in u.entries if e.members and not e.piece == "sz"]
        assert len(fused) == 2 and {p.form for p in r.placed[j] if p.entry.members} == {form}
        layer = r.model.layers()[str(u.index)]
        lins = [m for m in layer.modules() if isinstance(m, (nn.Linear, Linear))]
        assert len(lins) == 4
        staging = r.loader.wait(j)
        r.materialize(j, staging)
        dtype = torch.bfloat16 if kw.get("dtype") == "bf16" else torch.float32
        x = torch.randn(3, 128, dtype=dtype)
        for parent, (name, members) in FUSED.items():
            path_ = f"model.layers.{u.index}.{parent}"
            got = getattr(r.model.get_submodule(path_), name)(x)
            want = _members_out(ref, path_, members, x)
            torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-3)
        r.loader.free(j)

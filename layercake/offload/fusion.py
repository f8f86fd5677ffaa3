"""Fused linears of streamed layers: q/k/v and gate/up (a family's ``Model.fused``) become one
weight each, as in memory (``models.build``), so a streamed layer runs one matmul for its
attention's input projections and one for its MLP's instead of five.

The fusion is made in the offload layout itself: the members' rows, in the order ``Model.fused``
names them, are one tensor of the unit (``store.Entry.members``), so each tier holds a row range
of the fused weight and a unit is materialized into one buffer per fused weight, never copied
again. Members are fused only where each would be held in the same form (the ops layer's
chooser), the same quantized form and the same storage dtype, and the fused weight too."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from layercake.checkpoint.quantized import quant_spec, weight_quant
from layercake.ops.linear import choose
from layercake.quant import Compression

# fused parameter name -> its members' (parameter name, rows), in row order
Fusions = dict[str, tuple[tuple[str, int], ...]]


def fuse_linears(
    ckpt: Any,
    model: nn.Module,
    layers: tuple[int, ...],
    compute: torch.dtype,
    compress: Compression | None,
) -> Fusions:
    """Replace each fusable group of the held layers' linears of ``model`` (on the meta device)
    by one ``nn.Linear`` whose rows are the members' side by side; returns the fused parameters'
    members. Groups already fused (a second call) are left as they are."""
    out: Fusions = {}
    names = set(ckpt.tensor_names())
    groups = getattr(type(model), "fused", {})
    for i in layers:
        module = model.layers()[str(i)]  # layer i
        layer = module_name(model, module)
        for name, parent in list(module.named_modules()):
            for fused, members in groups.items():
                mods = [getattr(parent, m, None) for m in members]
                if not all(type(m) is nn.Linear for m in mods):
                    continue
                prefix = f"{layer}.{name}." if name else f"{layer}."
                if not _alike(ckpt, model, names, [prefix + m for m in members], compute,
                              compress):  # fmt: skip
                    continue
                n = sum(m.out_features for m in mods)
                bias = mods[0].bias is not None
                with torch.device("meta"):
                    one = nn.Linear(mods[0].in_features, n, bias=bias)
                for m in members:
                    delattr(parent, m)
                setattr(parent, fused, one)
                for p in ("weight", "bias") if bias else ("weight",):
                    out[f"{prefix}{fused}.{p}"] = tuple(
                        (f"{prefix}{m}.{p}", mod.out_features) for m, mod in zip(members, mods)
                    )
    return out


def _alike(
    ckpt: Any,
    model: nn.Module,
    names: set[str],
    members: list[str],
    compute: torch.dtype,
    compress: Compression | None,
) -> bool:
    """Whether the linears ``members`` would be held alike when streamed: one form (for each
    and for the fused weight), one quantized form, one storage dtype, all with or without bias."""
    kinds, shapes = set(), []
    for m in members:
        owner = model.get_submodule(m)
        src = model.source_name(f"{m}.weight", names)
        if src not in names:
            return False
        shape = (owner.out_features, owner.in_features)
        quant = weight_quant(ckpt, src, compress, shape[1]) if compress is not None else ""
        stored = ckpt.stored_dtype(src)
        kinds.add((_form(shape, quant, stored, compute), quant, stored, owner.bias is not None))
        shapes.append(shape)
    if len(kinds) != 1:
        return False
    form, quant, stored, _ = kinds.pop()
    fused = (sum(s[0] for s in shapes), shapes[0][1])
    return _form(fused, quant, stored, compute) == form


def _form(
    shape: tuple[int, int], quant: str, stored: torch.dtype | None, compute: torch.dtype
) -> str:
    spec = quant_spec(quant) if quant else None
    return choose(shape, stored=None if quant else stored, spec=spec, device="cpu",
                  dtype=compute, streamed=True)  # fmt: skip


def module_name(model: nn.Module, module: nn.Module) -> str:
    """``module``'s name in ``model``."""
    for name, m in model.named_modules():
        if m is module:
            return name
    raise KeyError("module not in model")

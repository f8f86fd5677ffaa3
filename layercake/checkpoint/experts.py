"""Expert weights as the model names them, whatever form the checkpoint stores them in.

The model holds each expert as its own linears, ``model.layers.N.mlp.experts.E.gate_proj.weight``
(and ``up_proj``, ``down_proj``), the names Qwen-MoE and OLMoE checkpoints use. Others store:

- Mixtral: ``block_sparse_moe.experts.E.w1/w3/w2.weight`` (gate, up, down) and
  ``block_sparse_moe.gate.weight`` (the router): plain renames;
- transformers 5 (``save_pretrained(save_original_format=False)``) and GGUF: all experts of a
  layer stacked in one tensor: ``mlp.experts.gate_up_proj`` (E, 2 I, hidden), gate rows first;
  ``mlp.experts.gate_proj`` / ``up_proj`` (E, I, hidden) (GGUF's ``ffn_gate_exps`` ...);
  ``mlp.experts.down_proj`` (E, hidden, I).

``Part`` says where a model tensor lies in a stored one: a block of rows of the stored tensor
seen as 2-D (rows, last dim), so an expert is read alone, as a view of the file where the
stored dtype allows, and a slice reads only its own layers' experts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

_MIXTRAL = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
# stacked tensor leaf -> the expert linears it holds, in row order
_STACKED = {
    "gate_up_proj": ("gate_proj", "up_proj"),
    "gate_proj": ("gate_proj",),
    "up_proj": ("up_proj",),
    "down_proj": ("down_proj",),
}
_MIXTRAL_RE = re.compile(
    r"(model\.layers\.\d+)\.block_sparse_moe\.(?:experts\.(\d+)\.(w[123])|(gate))\.weight"
)
_STACKED_RE = re.compile(
    r"(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|gate_proj|up_proj|down_proj)"
)


@dataclass(frozen=True)
class Part:
    """A model tensor inside stored tensor ``src``: expert ``expert``'s ``chunk`` of ``chunks``
    equal row blocks (``expert`` -1: all of ``src``, a rename)."""

    src: str
    expert: int = -1
    chunk: int = 0
    chunks: int = 1

    def rows(self, shape: tuple[int, ...]) -> tuple[int, int] | None:
        """Its rows [lo, hi) of ``src`` (of ``shape``) seen as (rows, shape[-1]); None: all."""
        if self.expert < 0:
            return None
        n = shape[1] // self.chunks
        lo = self.expert * shape[1] + self.chunk * n
        return lo, lo + n


def expert_parts(config: dict[str, Any], names: Iterable[str]) -> dict[str, Part]:
    """Model tensor name -> ``Part`` for each expert tensor stored under another name or
    stacked (``names``: the stored tensors); names stored as the model names them are absent."""
    experts = int(config.get("num_experts") or config.get("num_local_experts") or 0)
    out: dict[str, Part] = {}
    for name in names:
        if m := _MIXTRAL_RE.fullmatch(name):
            layer, e, w, gate = m.groups()
            new = f"{layer}.mlp.gate.weight" if gate else (
                f"{layer}.mlp.experts.{e}.{_MIXTRAL[w]}.weight")  # fmt: skip
            out[new] = Part(name)
        elif m := _STACKED_RE.fullmatch(name):
            prefix, leaf = m.groups()
            members = _STACKED[leaf]
            for e in range(experts):
                for i, member in enumerate(members):
                    out[f"{prefix}.{e}.{member}.weight"] = Part(name, e, i, len(members))
    return out


def model_names(names: Iterable[str], parts: dict[str, Part]) -> list[str]:
    """The model's tensor names for a checkpoint storing ``names``: those stored as named, in
    order, then each expert tensor of ``parts`` in place of the stored one that holds it."""
    held = {p.src for p in parts.values()}
    return [n for n in names if n not in held] + list(parts)

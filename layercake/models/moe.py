"""Mixture-of-experts feed-forward: a softmax top-k router and experts, each expert the Llama
SwiGLU MLP with its own linear weights (``layers.N.mlp.experts.E.*``: one placement unit, each
weight in the form ``ops.linear.choose`` picks, so quantized experts run on the block kernels).

Rows are grouped by expert: per call, each selected expert runs once on all the rows that chose
it (whatever the batch and sequence length), and experts nobody chose are not touched.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch import nn

from layercake.models.llama import MLP, Config


class Gate(nn.Linear):
    """A router's linear, kept dense in the compute dtype (never quantized or packed: a small
    error in its logits changes which experts run). ``models.build`` quantizes only plain
    ``nn.Linear`` modules."""


def route(logits: torch.Tensor, top_k: int, renorm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits (N, E) -> (weights (N, k) fp32, expert ids (N, k)): softmax over every
    expert, the top k kept, renormalised to sum to one where the family does (Mixtral,
    Qwen3-MoE) and not where it does not (Qwen1.5-MoE, OLMoE)."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renorm:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


# choices whose rows are gathered back at a time (``grouped``'s last step): the gather's buffer
# stays small whatever the block, so the only block-sized buffer is the choices' rows
GATHER_CHOICES = 2048


def grouped(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    experts: nn.ModuleList,
    run_order: Iterable[int] | None = None,
    rows: RowsBuffer | None = None,
) -> torch.Tensor:
    """sum_k weights[n, k] * experts[ids[n, k]](x[n]) for rows x (N, hidden), with the N x k
    choices sorted by expert so that each chosen expert runs once on a contiguous block of its
    rows; returns (N, hidden). ``run_order``: the order the chosen experts run in (every chosen
    one; default expert order; may be decided as it goes), e.g. those in RAM while others are
    still being read.

    One (N k, hidden) buffer: each choice's row, overwritten by its expert's output (the input
    block is consumed before the output is written), then gathered back a few rows at a time:
    at a prompt's pass of a large block that buffer is most of the activations. ``rows``: where
    that buffer is kept between calls (else a fresh one each call)."""
    N, k = ids.shape
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # choices grouped by expert, rows in order
    counts = torch.bincount(flat, minlength=len(experts)).tolist()
    src = order // k
    if rows is None:
        ys = x.index_select(0, src)  # (N k, hidden): each choice's row, then its output
    else:
        ys = torch.index_select(x, 0, src, out=rows.get(N * k, x))
    starts = [0] * len(counts)
    for e in range(1, len(counts)):
        starts[e] = starts[e - 1] + counts[e - 1]
    for e in run_order if run_order is not None else range(len(counts)):
        a, n = starts[e], counts[e]
        if n:
            mine, expert = ys[a : a + n], experts[e]
            into = getattr(expert, "forward_into", None)  # its output over its rows, no copy
            if into is None or not into(mine, mine):
                ys[a : a + n] = expert.forward(mine)
    # back in (row, choice) order (a gather: no scatter-add, whose CPU kernel is slow), then
    # each row's weighted sum of its k outputs as one batched matmul, a chunk of rows at a time
    back = torch.argsort(order)
    w = weights.to(ys.dtype).unsqueeze(1)  # (N, 1, k)
    out = ys.new_empty(N, ys.shape[1])
    step = max(1, GATHER_CHOICES // k)
    for r in range(0, N, step):
        n = min(step, N - r)
        mine = ys.index_select(0, back[r * k : (r + n) * k]).view(n, k, -1)
        out[r : r + n] = torch.bmm(w[r : r + n], mine).view(n, -1)
    return out


class RowsBuffer:
    """``grouped``'s choice rows kept between calls (one per offloaded model): a block-sized
    buffer allocated fresh at every layer of a prompt's pass costs its page faults each time
    (a fresh allocation of that size is mapped anew by the C heap), more than its gather. It
    keeps the largest size asked for (the memory plan counts it as activations) until a call
    needs less than a quarter of it (decode steps after a prompt's pass): then it is let go,
    so that a cap's page cache gets that memory back between prompts."""

    def __init__(self) -> None:
        self.buf: torch.Tensor | None = None

    def get(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """An (n, hidden) view in ``like``'s dtype and device."""
        b = self.buf
        fits = (b is not None and b.dtype == like.dtype and b.device == like.device
                and b.shape[1] == like.shape[1] and n <= b.shape[0] < 4 * max(1, n))  # fmt: skip
        if not fits:
            self.buf = b = None  # the old one goes before the new one is allocated
            self.buf = b = like.new_empty(n, like.shape[1])
        return b[:n]


class SparseMoE(nn.Module):
    """Router (``gate``) + ``experts``, and where the family has one a shared expert whose
    output is scaled by a sigmoid gate (Qwen2-MoE)."""

    def __init__(self, c: Config, num_experts: int, top_k: int, size: int, renorm: bool,
                 shared_size: int = 0) -> None:  # fmt: skip
        super().__init__()
        self.top_k, self.renorm = top_k, renorm
        self.gate = Gate(c.hidden_size, num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(c, size) for _ in range(num_experts))
        self.shared_expert: MLP | None = None
        if shared_size:
            self.shared_expert = MLP(c, shared_size)
            self.shared_expert_gate = Gate(c.hidden_size, 1, bias=False)
        _LIVE[id(self)] = self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, hidden): every row of the batch together
        weights, ids = route(self.gate.forward(x), self.top_k, self.renorm)
        if torch.compiler.is_compiling():  # data-dependent grouping: one opaque op in a graph
            out = torch.ops.layercake.moe_experts(x, ids, weights, id(self))
        else:
            out = self.run_experts(x, ids, weights)
        if self.shared_expert is not None:
            gate = torch.sigmoid(self.shared_expert_gate.forward(x))  # (N, 1)
            out = out + gate * self.shared_expert.forward(x)
        return out.view(shape)

    def run_experts(
        self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """The routed experts' weighted sum for rows x (N, hidden) (the offload executor
        wraps this to bring in the chosen experts first)."""
        return grouped(x, ids, weights, self.experts)


# Live blocks by id: a compiled graph calls its block's experts through the custom op below,
# which takes the block's id (an int) since an op cannot take a module.
_LIVE: weakref.WeakValueDictionary[int, SparseMoE] = weakref.WeakValueDictionary()


@torch.library.custom_op("layercake::moe_experts", mutates_args=())
def _moe_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, block: int
                 ) -> torch.Tensor:  # fmt: skip
    return _LIVE[block].run_experts(x, ids, weights)


@_moe_experts.register_fake
def _(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, block: int) -> torch.Tensor:
    return torch.empty_like(x)


__all__ = ["Gate", "RowsBuffer", "SparseMoE", "grouped", "route"]

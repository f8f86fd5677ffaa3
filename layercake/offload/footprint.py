"""Memory accounting of offloading: the bytes of the streamed units, of a block's (the
micro-batches that share each load of a layer) KV cache and activations, of the resident tensors
outside the units, and of the process itself. The budget planner (``policy``), the cost model
(``planner``), ``auto`` and the runner factory read every memory figure from here."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from layercake.config import BaseConfig
from layercake.errors import LayercakeError
from layercake.kv_cache import QuantKV
from layercake.models.moe import GATHER_CHOICES
from layercake.models.parts import Parts
from layercake.offload.policy import (
    RESIDENT_SCRATCH,
    STAGING_SLOTS,
    Policy,
    expert_slots,
    split_bytes,
)
from layercake.offload.tiers import ALIGN
from layercake.ops.linear import WIDEN_SLAB
from layercake.quant import Compression, QuantSpec

if TYPE_CHECKING:
    from layercake.models.base import DecoderSlice
    from layercake.offload.store import Unit

SAFETY = 96 * 2**20  # allocator slack, thread stacks, the tokenizer's growth: kept free
# routed experts: besides SAFETY, page cache a memory cap counts and the run needs (code and
# files read outside the resident set); a MoE plan filling a cap to SAFETY was OOM-killed, one
# leaving this much more ran at full speed (README, MoE offload)
EXPERT_CACHE_HEADROOM = 100 * 2**20
# ... and at least this much free for the page cache at decode together with the room a prompt's
# activations leave once the prompt has run: B=64 ran clean with 235 MB there (130 MB of a
# 16-token prompt's activations and the headroom; moe8), thrashed with 160 MB and less (moe6's
# experts held in that room); B=8 and B=1, whose activations are 20-40 MB, had only ~140 MB
# and were OOM-killed or thrashed (240 GB refaulted in 3 min; moe8 hold c). Those runs also kept
# the moved-out experts' pages (0.28 GB, fixed in moe10: ``tiers.let_go``), most likely the
# cause; kept for the prompt's pass (not re-measured without it): decode steps get this room
# back as extra experts (``decode_room``)
EXPERT_DECODE_ROOM = 224 * 2**20
WIDEN_BYTES = 4 * WIDEN_SLAB  # the fp32 slab a prompt's bf16 weights widen into (``ops.linear``)
MAX_ENTRIES = 16  # tensors of a unit that a staging slot's alignment slack allows for


@dataclass(frozen=True)
class Footprint:
    """What a placement needs besides the placed weights, for budget planning (bytes)."""

    weights: int  # all streamed units, storage dtype
    compute_ratio: float  # compute itemsize / storage itemsize (fp32 over bf16: 2)
    max_unit: int  # the largest unit, storage dtype
    activations: int  # hidden states, MLP intermediates and logits of one block
    kv: int  # the KV cache of one block at the planned context
    # compressed weights: one unit dequantized; ``as_stored``: a unit's vectors converted (else
    # max_unit * compute_ratio)
    scratch: int = 0
    # bf16 weights multiply as stored on the CPU when not all resident (``kernels.bf16_mm``):
    # only a unit's vectors (norms, biases) convert, into ``scratch`` (with the slab a prompt
    # widens them into)
    as_stored: bool = False
    # routed experts (``offload.experts``): the staging ring of their own loader, and the bytes
    # of the units that always run (attention, router, shared expert, head): placed in RAM
    # before any expert, so that once they fit only experts stream (no layers' staging ring)
    expert_staging: int = 0
    always: int = 0
    headroom: int = 0  # kept free for the page cache (``EXPERT_CACHE_HEADROOM``)
    step_activations: int = 0  # routed experts: a one-token step's (``decode_room``)

    def layers_stream(self, ram: float) -> bool:
        """Whether units other than routed experts have rows on disk when ``ram`` bytes of
        the weights are held (every unit streams that does not fit, without routed experts)."""
        return not self.expert_staging or ram < self.always

    @property
    def work(self) -> int:
        """The scratch a streamed (not all resident) placement converts weights into, and the
        routed experts' staging ring."""
        return (self.scratch or int(self.max_unit * self.compute_ratio)) + self.expert_staging

    @property
    def align(self) -> int:
        """Alignment slack of one staging slot: every tensor of a unit starts 4 KiB-aligned."""
        return (MAX_ENTRIES + 2) * ALIGN


def kv_value_bytes(dtype: torch.dtype, spec: QuantSpec | None, head_dim: int) -> float:
    """Bytes of one cached key (or value) element: the compute dtype's, or (a compressed cache,
    ``spec``) a quantized row's share."""
    return QuantKV.nbytes_per_value(spec, head_dim) if spec is not None else float(dtype.itemsize)


def kv_bytes(config: BaseConfig, rows: int, context: int, layers: int, value_bytes: float) -> int:
    """Bytes of the keys and values of ``layers`` layers for ``rows`` sequences of ``context``
    tokens (``value_bytes`` from ``kv_value_bytes``)."""
    kv = 2 * value_bytes * rows * context * layers * config.num_key_value_heads
    return int(kv * config.head_dim)


def footprint(
    ckpt: Any,
    config: BaseConfig,
    parts: Parts,
    dtype: torch.dtype,
    batch_size: int,
    num_batches: int,
    context: int,
    compress: Compression | None = None,
    int4pack: bool = False,
    pass_tokens: int | None = None,
) -> Footprint:
    """Sizes of the streamed units and of one block's cache and activations. Compressed
    weights are held compressed in every tier, the device's included (ratio 1); each unit is
    dequantized into a compute-dtype scratch, or (``int4pack``, the int4 CPU kernel's form) has
    its scales transposed and its values gathered from two tiers into a byte scratch.
    Activations: a pass of ``pass_tokens`` tokens per sequence (default ``context``: a whole
    prompt; a pipeline stage's prompt chunks are shorter); logits only where the head is."""
    block = batch_size * num_batches
    units = streamed_units(ckpt, config, parts, dtype, compress, int4pack)[1]
    weights = sum(u.nbytes for u in units)
    experts = [u.nbytes for u in units if u.kind == "expert"]
    itemsize = units[0].entries[0].torch_dtype.itemsize
    scratch = max(
        sum(e.nbytes if e.piece else e.numel * dtype.itemsize for e in u.entries) for u in units
    )
    compressed = compress is not None and compress.weight is not None
    as_stored = bf16_as_stored(units, dtype, compress)  # then only vectors (norms, biases) convert
    vector_scratch = max(
        sum(e.numel * dtype.itemsize for e in u.entries if len(e.shape) == 1) for u in units
    )
    widest = (  # a fused weight's widest member: the intermediates are the members'
        max(
            max((r for _, r in e.members), default=e.shape[0])
            for u in units
            for e in u.entries
            if u.kind == "layer"
        )  # fmt: skip
        if any(u.kind == "layer" for u in units)
        else config.hidden_size
    )
    tokens = min(context, pass_tokens) if pass_tokens else context

    def activations(rows: int, tokens: int) -> int:
        """Activations of a pass of ``tokens`` per row, ``rows`` rows per micro-batch."""
        micro = rows * tokens  # intermediates: one micro-batch at a time
        act = 4 * (micro * 2 * widest + block * tokens * 2 * config.hidden_size)
        if parts.head:
            act += 4 * block * config.vocab_size  # the logits of a step
        if experts:  # ``models.moe.grouped``: each token's row once per chosen expert (one
            # buffer, the experts' outputs written over their inputs), gathered back a chunk
            # at a time
            choices = micro * getattr(config, "num_experts_per_tok", 1)
            act += 4 * (choices + GATHER_CHOICES) * config.hidden_size
        return act

    act = activations(batch_size, tokens)
    spec = compress.cache_spec(config.head_dim) if compress is not None else None
    if spec is not None:  # the two dequantized work buffers of one layer (shared by every layer)
        act += kv_bytes(config, block, context, 1, dtype.itemsize)
    kv = kv_bytes(
        config, block, context, len(parts.layers), kv_value_bytes(dtype, spec, config.head_dim)
    )
    return Footprint(
        weights=weights,
        compute_ratio=1.0 if compressed else dtype.itemsize / itemsize,
        scratch=scratch if compressed else vector_scratch + widen_bytes() if as_stored else 0,
        as_stored=as_stored,
        max_unit=max(u.nbytes for u in units),
        expert_staging=expert_slots(max(experts)) * (max(experts) + 2 * ALIGN) if experts else 0,
        always=weights - sum(experts),
        headroom=max(EXPERT_CACHE_HEADROOM, EXPERT_DECODE_ROOM - act) if experts else 0,
        activations=act,
        kv=kv,
        step_activations=activations(block, 1) if experts else 0,  # a step: the block at once
    )


def decode_room(fp: Footprint) -> int:
    """Bytes a one-token step of the block leaves free of what the plan (``fp``, for a prompt's
    pass) keeps besides the weights, for extra routed experts at decode (``experts``): the
    prompt's activations less the step's (``step_activations``), and the page-cache headroom,
    which a prompt's pass needs (at B=64 the cgroup is at the cap through it, its heap 0.17 GB
    over a step's) and a step does not: the files its code maps are in the process's pages the
    plan counts (``held_bytes``), the experts are read past the page cache, and the moved-out
    experts' pages, which took that room and more at decode (0.28 GB at B=64, B=8 alike), now
    go (``tiers.let_go``). Measured at B=64, B=8, B=1 under the 2.5 GiB cap (README, MoE
    offload, moe10): no file page refaulted at decode."""
    if not fp.expert_staging:
        return 0
    return max(0, fp.activations - fp.step_activations + fp.headroom)


def widen_bytes() -> int:
    """The slab a prompt's bf16 weights widen into for MKL; none where they multiply on AMX tiles
    (``ops.linear.BF16`` widens only without AMX)."""
    from layercake.ops import kernels

    return 0 if kernels.amx() else WIDEN_BYTES


def bf16_as_stored(units: list, dtype: torch.dtype, compress: Compression | None) -> bool:
    """Whether streamed bf16 weights multiply as stored (fp32 compute on the CPU, our kernel)."""
    from layercake.ops import kernels

    return (
        (compress is None or compress.weight is None)
        and dtype == torch.float32
        and all(e.torch_dtype == torch.bfloat16 for u in units for e in u.entries)
        and kernels.available()
    )


def streamed_units(
    ckpt: Any,
    config: BaseConfig,
    parts: Parts,
    dtype: torch.dtype,
    compress: Compression | None,
    int4pack: bool = False,
) -> tuple[torch.nn.Module, list]:
    """The slice's model on the meta device (its fusable linears fused) and its streamed units
    (``store.plan_units``; ``int4pack``: CPU compute, int4 weights in the kernel's form)."""
    from layercake.models import family
    from layercake.offload.store import plan_units

    fam = family(config.model_type)
    with torch.device("meta"):
        model = fam.Model(config, parts)
    int4pack = int4pack and dtype == torch.float32
    units = plan_units(ckpt, model, parts.layers, parts.head, dtype, compress, int4pack)
    if not units:
        raise LayercakeError(f"part {parts} has no layers or head to offload")
    return model, units


def memory_bytes(fp: Footprint, policy: Policy, cuda: bool, static: int, base: int) -> dict:
    """Host bytes the runner holds under ``policy`` (device bytes on CUDA are not host bytes)."""
    W, U = fp.weights, fp.max_unit
    dev, cpu, disk = split_bytes(W, policy.w_device, policy.w_cpu)
    kv = int(fp.kv * (policy.cache_device + policy.cache_cpu) / 100)
    out = {"process_and_safety": base, "static": static}
    if fp.headroom:
        out["page_cache_headroom"] = fp.headroom
    if policy.w_device == 100 and policy.cache_device == 100 and not cuda:
        out["weights"] = int(W * fp.compute_ratio)
        if fp.scratch:
            out["scratch"] = min(fp.scratch, RESIDENT_SCRATCH)
        out.update(kv_cache=kv, activations=fp.activations)
        return out
    out["weights"] = cpu + (0 if cuda else int(dev * fp.compute_ratio))
    # the slots of a unit's disk rows, each with its tensors' 4 KiB alignment
    streams = disk and fp.layers_stream(W - disk)
    out["staging"] = STAGING_SLOTS * (math.ceil(U * disk / W) + fp.align) if streams else 0
    if not cuda:
        out["scratch"] = fp.work
        out.update(kv_cache=kv, activations=fp.activations)
    return out


def static_bytes(
    ckpt: Any,
    model: DecoderSlice,
    units: list[Unit],
    dtype: torch.dtype,
    device: torch.device,
    touched_rows: int,
) -> int:
    """Host bytes of the resident tensors outside the units (embeddings, norms): a table kept as
    a view of the checkpoint costs only the rows a block touches."""
    from layercake.models.build import embedding_dtype

    unit_params = {e.param for u in units for e in u.entries} | {"lm_head.weight"}
    names = set(ckpt.tensor_names())
    total = 0
    for name, p in model.named_parameters():
        if name in unit_params:
            continue
        src = model.source_name(name, names)
        owner = model.get_submodule(name.rpartition(".")[0])
        if isinstance(owner, torch.nn.Embedding) and src in names:
            want = embedding_dtype(ckpt, src, dtype, device)
            if want != dtype:  # a view: the rows looked up are paged in
                row = p.shape[-1] * want.itemsize
                total += min(p.shape[0], touched_rows) * (row + 4096)
                continue
        if device.type == "cpu":
            total += p.numel() * dtype.itemsize
    return total


def held_bytes() -> int:
    """Host bytes a whole-process budget has spent already: this process now, and ``SAFETY``."""
    return process_rss() + SAFETY


def process_rss() -> int:
    """Resident bytes of this process now (0 where /proc is missing)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    import mmap

    return pages * mmap.PAGESIZE

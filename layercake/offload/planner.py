"""The planner: picks batch size, micro-batches, placement and compression from memory budgets and
this machine's measured rates, with a cost model of the offload executor.

Cost model, per forward step (prefill and decode separately). Units (decoder layers, head slabs)
run one after another; while one computes, the loader reads the next one's disk rows, so a unit
costs ``max(disk rows / disk rate, compute)``, where compute = making its weights ready (convert
or dequantize, measured) + one measured micro-batch time per micro-batch (``calibrate``). KV cache
layers on disk add their reads and write-backs, not overlapped (page faults in the compute
thread). Throughput is FlexGen's: block x generated tokens / (prefill + decode time).

Memory, per candidate: ``footprint`` (the runner's own accounting: one block's activations and
logits, the conversion scratch, the KV cache at the planned context) plus resident embeddings and
norms, the process as it is now and ``SAFETY``; ``plan_policy`` places weights in what is left,
with the loader's staging buffers for the disk share. Candidates that do not fit are dropped,
never squeezed: the plan never holds more than the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from layercake.config import BaseConfig
from layercake.errors import LayercakeError
from layercake.offload.calibrate import UnitTimes
from layercake.offload.footprint import Footprint, kv_bytes, memory_bytes
from layercake.offload.measure import Machine
from layercake.offload.policy import STAGING_SLOTS, Policy, plan_policy, split_bytes
from layercake.offload.store import Unit
from layercake.quant import Compression

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
NUM_BATCHES = (1, 2, 4, 8)
KV_SHARES = (1.0, 0.75, 0.5, 0.25, 0.0)  # of the KV cache kept in RAM (CPU); the rest on disk


@dataclass(frozen=True)
class Workload:
    """What the plan serves: ``prompt_len`` + ``gen_len`` tokens per sequence and at most
    ``max_sequences`` sequences at once (a bigger block than there are prompts helps nothing)."""

    prompt_len: int = 32
    gen_len: int = 32
    max_sequences: int = 256

    @property
    def context(self) -> int:
        return self.prompt_len + self.gen_len


@dataclass(frozen=True)
class Plan:
    """A chosen policy and what the cost model predicts for it (seconds, bytes, tokens/s)."""

    policy: Policy
    compress: Compression | None
    resident: bool  # everything fits: the in-memory runner
    prefill_s: float
    decode_step_s: float
    throughput: float
    memory: dict[str, int]
    disk_bytes_per_step: int
    workload: Workload
    budget: int | None
    alternatives: list[dict[str, Any]] = field(default_factory=list)

    @property
    def total_memory(self) -> int:
        return sum(self.memory.values())

    @property
    def weight_form(self) -> str | None:
        """``int4-g64`` and the like when weights are compressed, else None."""
        c = self.compress
        return str(c.weight) if c is not None and c.weight is not None else None

    def flags(self) -> str:
        """The engine flags that reproduce this plan (besides the budgets and dirs)."""
        p = self.policy
        out = [] if self.resident else ["--percent " + " ".join(f"{x:.4g}" for x in p.percent)]
        out += [f"--batch-size {p.batch_size}", f"--num-batches {p.num_batches}"]
        if self.compress is not None and self.compress.weight is not None:
            out.append(f"--compress-weight --compress-bits {self.compress.weight.bits}")
            out.append(f"--group-size {self.compress.weight.group_size}")
        return " ".join(out)

    def to_json(self) -> dict[str, Any]:
        p = self.policy
        return {
            "flags": self.flags(),
            "percent": list(p.percent),
            "batch_size": p.batch_size,
            "num_batches": p.num_batches,
            "block": p.block_size,
            "compress_weight": self.weight_form,
            "resident": self.resident,
            "prompt_len": self.workload.prompt_len,
            "gen_len": self.workload.gen_len,
            "predicted_prefill_s": round(self.prefill_s, 3),
            "predicted_decode_step_s": round(self.decode_step_s, 4),
            "predicted_tok_s": round(self.throughput, 2),
            "predicted_memory_bytes": self.total_memory,
            "memory": self.memory,
            "budget_bytes": self.budget,
            "disk_bytes_per_step": self.disk_bytes_per_step,
            "alternatives": self.alternatives,
        }


@dataclass(frozen=True)
class Model:
    """What the planner needs of a model, for one compression choice."""

    units: list[Unit]
    config: BaseConfig
    static_bytes: int  # embeddings, norms: resident, outside the units
    times: UnitTimes
    compress: Compression | None
    kv_itemsize: float
    footprint: Any  # (batch_size, num_batches, context) -> Footprint


def step_seconds(
    m: Model, policy: Policy, machine: Machine, T: int, cuda: bool, kv_on_disk: int, context: int
) -> tuple[float, int]:
    """(seconds, disk bytes) of one forward step of a block, ``T`` new tokens per sequence
    (``T`` > 1: prefill, timed as ``calibrate`` did at the prompt length)."""
    bs, nb = policy.batch_size, policy.num_batches
    per_batch = m.times.prefill_layer_s if T > 1 else m.times.decode_layer_s
    blk, head = _at(per_batch, bs), _at(m.times.head_s_per_row, bs)
    total, read = 0.0, 0
    # routed experts (``offload.experts``): read when chosen, a layer's reads while it computes
    k = getattr(m.config, "num_experts_per_tok", 0) or 1
    held, cold = expert_reads(m.units, policy, k, bs * T if T > 1 else bs * nb, nb if T > 1 else 1)
    for j, u in enumerate(m.units):
        if u.kind == "expert":
            continue
        dev, _, disk = split_bytes(u.nbytes, policy.w_device, policy.w_cpu)
        if held is not None:  # MoE: the always-run units held first (``experts.resident_bytes``)
            dev, disk = sum(held[j]), u.nbytes - sum(held[j])
            disk += cold.get(u.index, 0) if u.kind == "layer" else 0
        # the load term: on CUDA the copies of the rows off the device, on CPU a pass over the
        # whole unit (its rows are converted into one scratch) unless all are resident
        ready = 0.0 if dev == u.nbytes else (1 - dev / u.nbytes if cuda else 1.0)
        if u.kind == "layer":
            compute = ready * m.times.layer_load_s + nb * blk
        else:
            rows = u.entries[0].shape[0]
            compute = rows * (ready * m.times.head_load_s_per_row + nb * head)
        disk_s = disk / (machine.disk_gbps * 1e9) if disk else 0.0
        total += max(disk_s, compute)
        read += disk
    if kv_on_disk:  # read (and, decoding, written back) through mapped files, not overlapped
        per_layer = kv_bytes(m.config, policy.block_size, context, 1, m.kv_itemsize)
        total += kv_on_disk * per_layer * (1 if T > 1 else 2) / (machine.disk_gbps * 1e9)
    return total, read


def expert_reads(units: list[Unit], policy: Policy, top_k: int, rows: int, passes: int
                 ) -> tuple[dict[int, tuple[int, int]] | None, dict[int, int]]:  # fmt: skip
    """Each unit's (device, RAM) bytes (``experts.resident_bytes``; None for a dense model) and
    the expected bytes of routed experts read per MoE layer in one step: ``passes`` passes of
    ``rows`` rows each, each pass reading the chosen experts not held in RAM once (the routing
    model, uniform routing: ``routing.expected_cold_reads``)."""
    from layercake.offload.experts import resident_bytes
    from layercake.offload.routing import expected_cold_reads, uniform_probs

    split = resident_bytes(units, policy.w_device, policy.w_cpu)
    if split is None:
        return None, {}
    layers: dict[int, list[int]] = {}
    for j, u in enumerate(units):
        if u.kind == "expert":
            layers.setdefault(u.index, []).append(j)
    out: dict[int, int] = {}
    for i, js in layers.items():
        held = sum(1 for j in js if sum(split[j]) == units[j].nbytes)
        reads = expected_cold_reads(uniform_probs(len(js), min(top_k, len(js))), rows, held)
        out[i] = int(passes * reads * max(units[j].nbytes for j in js))
    return split, out


def _at(table: dict[int, float], bs: int) -> float:
    """A measured per-batch-size time at ``bs``; between measured sizes, linear in bs."""
    if bs in table:
        return table[bs]
    keys = sorted(table)
    lo = max((k for k in keys if k < bs), default=keys[0])
    hi = min((k for k in keys if k > bs), default=keys[-1])
    if lo == hi:
        return table[lo] * bs / lo
    return table[lo] + (table[hi] - table[lo]) * (bs - lo) / (hi - lo)


def search(
    models: list[Model],
    machine: Machine,
    workload: Workload,
    cpu_budget: int | None,
    device_budget: int | None,
    cuda: bool,
    base: int,
    offload_dir: Path | None,
    batch_size: int | None = None,
    num_batches: int | None = None,
) -> Plan:
    """The fastest candidate that fits; ``batch_size`` / ``num_batches`` fix those when given.
    ``base``: host bytes already held (this process) plus the safety margin."""
    found: list[Plan] = []
    smallest: tuple[int, LayercakeError] | None = None  # the error of the smallest block
    needs_disk = False
    for m in models:
        for bs in (batch_size,) if batch_size else BATCH_SIZES:
            for nb in (num_batches,) if num_batches else NUM_BATCHES:
                if bs * nb > max(workload.max_sequences, 1) and (bs > 1 or nb > 1):
                    continue
                fp = m.footprint(bs, nb, workload.context)
                for share in KV_SHARES if not cuda and offload_dir is not None else (1.0,):
                    try:
                        plan = _candidate(m, fp, machine, workload, cpu_budget, device_budget,
                                          cuda, base, share, bs, nb)  # fmt: skip
                    except LayercakeError as e:
                        if smallest is None or bs * nb < smallest[0]:
                            smallest = (bs * nb, e)
                        continue
                    if plan is not None and offload_dir is None and plan.disk_bytes_per_step:
                        needs_disk = True
                    elif plan is not None:
                        found.append(plan)
    if not found and needs_disk:
        raise LayercakeError("the weights do not fit the budget: give --offload-dir for the rest")
    if not found and cpu_budget is not None and not cuda:
        m = models[0]
        fp = m.footprint(1, 1, workload.context)
        least = base + m.static_bytes + fp.activations + fp.work
        least += fp.kv + STAGING_SLOTS * (fp.max_unit + fp.align) + 4096
        raise LayercakeError(
            f"--cpu-memory {cpu_budget / 1e9:.3f} GB is too small: streaming one layer at a "
            f"time, batch 1, {workload.context} tokens needs at least {least / 1e9:.3f} GB "
            f"(this process and safety margin {base / 1e9:.3f} GB included)"
        )
    if not found:
        raise smallest[1] if smallest else LayercakeError("no placement fits the budgets")
    found.sort(key=lambda p: (-round(p.throughput, 3), p.total_memory))
    best = found[0]
    alts = [_summary(p) for p in found[1:6]]
    return replace(best, alternatives=alts)


def _summary(p: Plan) -> dict[str, Any]:
    return {"flags": p.flags(), "predicted_tok_s": round(p.throughput, 2),
            "predicted_memory_bytes": p.total_memory}  # fmt: skip


def _candidate(m: Model, fp: Footprint, machine: Machine, w: Workload, cpu_budget: int | None,
               device_budget: int | None, cuda: bool, base: int, share: float, bs: int,
               nb: int) -> Plan | None:  # fmt: skip
    """The budget placement (``plan_policy``) for this batch with ``share`` of the KV cache in
    RAM; None when it does not fit or repeats another."""
    host = None if cpu_budget is None else cpu_budget - base - m.static_bytes
    if host is not None:  # the staging slots' alignment, and rounding, stay free
        host -= STAGING_SLOTS * fp.align + 4096
    fp_s = replace(fp, kv=int(fp.kv * share))
    policy = plan_policy(fp_s, host, device_budget, cuda, bs, nb)
    resident = policy.w_device == 100 and policy.cache_device == 100 and not cuda
    if resident and share < 1:
        return None  # everything fits with the whole cache in RAM: share 1 covers it
    n = sum(1 for u in m.units if u.kind == "layer")
    kept = share * (policy.cache_device + policy.cache_cpu)
    if not resident and kept < 100 and n:  # whole layers, as the runner keeps them
        in_ram = math.floor(n * kept / 100 + 1e-9)
        dev = 100.0 * in_ram / n if not cuda or policy.cache_cpu == 0 else policy.cache_device
        policy = replace(policy, cache_device=dev, cache_cpu=100.0 * in_ram / n - dev)
    plan = evaluate(m, fp, machine, w, policy, cuda, base, cpu_budget, resident)
    if cpu_budget is not None and plan.total_memory > cpu_budget:
        return None
    return plan


def evaluate(m: Model, fp: Footprint, machine: Machine, w: Workload, policy: Policy, cuda: bool,
             base: int, budget: int | None = None, resident: bool = False) -> Plan:  # fmt: skip
    """The cost model's prediction and the memory of running ``policy`` (any policy, planned or
    given by hand); ``resident``: the in-memory runner."""
    n = sum(1 for u in m.units if u.kind == "layer")
    kv_disk = n - round(n * (policy.cache_device + policy.cache_cpu) / 100) if n else 0
    mem = memory_bytes(fp, policy, cuda, m.static_bytes, base)
    prefill, read = step_seconds(m, policy, machine, w.prompt_len, cuda, kv_disk, w.prompt_len)
    decode, _ = step_seconds(m, policy, machine, 1, cuda, kv_disk, w.context)
    if resident:  # the in-memory runner converts nothing per step
        decode, prefill = _resident(m, policy, w)
        read = 0
    total = prefill + max(0, w.gen_len - 1) * decode
    tput = policy.block_size * w.gen_len / total if total > 0 else 0.0
    return Plan(policy, m.compress, resident, prefill, decode, tput, mem, read, w, budget)


def _resident(m: Model, policy: Policy, w: Workload) -> tuple[float, float]:
    """(decode step, prefill) of the in-memory runner: the measured compute, no weight loads."""
    layers = sum(1 for u in m.units if u.kind == "layer")
    rows = sum(u.entries[0].shape[0] for u in m.units if u.kind == "head")
    bs, nb = policy.batch_size, policy.num_batches

    # compressed weights stay compressed in memory: every use dequantizes (or unpacks) them
    load = 0.0 if m.compress is None or m.compress.weight is None else 1.0
    load *= layers * m.times.layer_load_s + rows * m.times.head_load_s_per_row

    def step(table: dict[int, float]) -> float:
        return load + nb * (layers * _at(table, bs) + rows * _at(m.times.head_s_per_row, bs))

    return step(m.times.decode_layer_s), step(m.times.prefill_layer_s)


def describe(plan: Plan) -> str:
    """The plan for a person: flags, prediction, memory."""
    gb = 1e9
    p = plan.policy
    lines = [
        f"policy: {p}" + (" (everything in memory)" if plan.resident else ""),
        f"flags:  {plan.flags()}",
        f"predicted: {plan.throughput:.2f} tok/s (block {p.block_size}, prompt "
        f"{plan.workload.prompt_len}, {plan.workload.gen_len} new tokens): prefill "
        f"{plan.prefill_s:.2f} s, decode {plan.decode_step_s:.3f} s/step, "
        f"{plan.disk_bytes_per_step / gb:.2f} GB read per step",
        "memory: "
        + ", ".join(f"{k} {v / gb:.3f}" for k, v in plan.memory.items() if v)
        + f" = {plan.total_memory / gb:.3f} GB"
        + (f" of {plan.budget / gb:.3f} GB" if plan.budget else ""),
    ]
    for a in plan.alternatives[:3]:
        lines.append(f"  next: {a['predicted_tok_s']:.2f} tok/s with {a['flags']}")
    return "\n".join(lines)


__all__ = ["Plan", "Workload", "describe", "search", "step_seconds"]

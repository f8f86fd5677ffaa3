"""The one runner factory: ``build_runner(options, ckpt, config, path)`` builds every runner of a
model (or a slice of it) on this host: in memory (``LocalRunner``, whose one-token steps are
compiled with ``compile``), offloaded (``OffloadRunner``, placed by percentages or planned from
budgets), everything-fits (the in-memory runner in the policy's blocks) and a plan's runner.

Planning (``offload.auto``: its probes are runners built here) and pipelines (``pipeline``: each
stage's runners are built here) sit above this module and call it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from layercake.config import BaseConfig
from layercake.errors import LayercakeError
from layercake.models.build import build_slice
from layercake.models.parts import Parts, parse_parts
from layercake.offload.executor import OffloadRunner
from layercake.offload.experts import decode_extra
from layercake.offload.footprint import decode_room, footprint, held_bytes, memory_bytes
from layercake.offload.kvdisk import RING
from layercake.offload.policy import STAGING_SLOTS, Policy, parse_bytes, plan_policy
from layercake.options import Options
from layercake.quant import Compression
from layercake.runner import LocalRunner, Runner

if TYPE_CHECKING:  # a type only: the planner times runners built here
    from layercake.offload.planner import Plan


def build_runner(
    options: Options,
    ckpt: Any,
    config: BaseConfig,
    path: Path,
    parts: Parts | None = None,
    plan: Plan | None = None,
) -> Runner:
    """The runner ``options`` describe for the checkpoint ``ckpt`` (read from ``path``):
    ``parts`` overrides ``options.parts`` (a pipeline stage's segment); ``plan`` (from
    ``offload.auto.auto_plan``) fixes the placement, batch and compression (``runner.plan``)."""
    if parts is None:
        parts = parse_parts(options.parts, config.num_hidden_layers)
    if plan is not None:
        return _planned(options, ckpt, config, path, parts, plan)
    if options.offloaded:
        return _offloaded(options, ckpt, config, path, parts)
    return _local(options, ckpt, config, parts)


def _local(o: Options, ckpt: Any, config: BaseConfig, parts: Parts) -> LocalRunner | Any:
    """The slice in memory, each weight in the form ``ops.linear.choose`` picks (fast unless
    ``exact``); with ``compile`` its one-token steps run as one compiled graph."""
    dev, dt, comp = o.torch_device, o.torch_dtype, o.compression
    fast = o.packed or not o.exact
    model = build_slice(ckpt, parts, dev, dt, config, compiled=o.compile, compress=comp, fast=fast)
    cache_quant = comp.cache_spec(config.head_dim) if comp is not None else None
    return LocalRunner([model], config, dev, dt, cache_quant, compile_step=o.compile)


def _resident(o: Options, ckpt: Any, config: BaseConfig, parts: Parts, policy: Policy) -> Any:
    """Everything fits the budget: the in-memory runner (packed or compressed weights), in the
    policy's blocks."""
    runner = _local(replace(o, compile=False), ckpt, config, parts)
    runner.block_size, runner.policy = policy.block_size, policy
    return runner


def _offloaded(
    o: Options, ckpt: Any, config: BaseConfig, source: Path, parts: Parts
) -> OffloadRunner | LocalRunner:
    """An ``OffloadRunner`` placed by ``percent`` (FlexGen's six numbers) or, without it, by
    byte budgets planned for blocks of ``batch_size x num_batches`` sequences of up to
    ``max_context`` tokens (longer ones put the cache of the layers that do not fit on disk).
    Compressed weights and cache are held compressed in every tier (budgets count their
    compressed bytes). ``cpu_cache_compute`` (CUDA): attention of layers whose cache is in host
    RAM or on disk runs on the CPU, where the cache is (FlexGen's ``--cpu-cache-compute``)."""
    device, dtype, compress = o.torch_device, o.torch_dtype, o.compression
    if o.cpu_cache_compute and device.type != "cuda":
        raise LayercakeError("--cpu-cache-compute needs --device cuda (on CPU it already is)")
    kw = {"batch_size": o.batch_size or 32, "num_batches": o.num_batches or 1}
    if o.percent is not None:
        policy = Policy.from_percent(o.percent, **kw)
        return OffloadRunner(o, ckpt, config, source, parts, policy)
    cpu_b, dev_b = parse_bytes(o.cpu_memory), parse_bytes(o.device_memory)
    if cpu_b is None and dev_b is None:
        raise LayercakeError("offloading needs --percent or a memory budget")
    fp = footprint(
        ckpt,
        config,
        parts,
        dtype,
        **kw,
        context=o.max_context or 256,
        compress=compress,
        int4pack=device.type == "cpu",
        pass_tokens=o.pass_tokens,
    )
    held = held_bytes()
    if cpu_b is not None:  # a budget for the whole process: what it holds already counts, and
        cpu_b -= held + STAGING_SLOTS * fp.align  # the staging slots' alignment (as the planner)
    policy = plan_policy(fp, cpu_b, dev_b, device.type == "cuda", **kw)
    if policy.cache_disk > 0:  # the ring that holds disk layers' cache rows in RAM
        ring = RING * fp.kv // max(1, len(parts.layers))
        fp = replace(fp, activations=fp.activations + ring)
        policy = plan_policy(fp, cpu_b, dev_b, device.type == "cuda", **kw)
    if policy.w_device == 100 and policy.cache_device == 100 and device.type == "cpu":
        return _resident(o, ckpt, config, parts, policy)
    # bytes of cache on the compute device (host RAM on CPU); on CUDA the policy's host share
    # goes to pinned RAM, the rest to disk
    kv_budget = int(fp.kv * policy.cache_device / 100)
    runner = OffloadRunner(o, ckpt, config, source, parts, policy, kv_budget)
    runner.memory = memory_bytes(fp, policy, device.type == "cuda", 0, held)  # the plan's bytes
    xu = runner.experts
    if xu is not None and runner.expert_loader is not None and not runner.cuda:
        if policy.cache_disk == 0:  # (a KV ring on disk: the activations are not these)
            xu.decode_extra = decode_extra(runner.units, decode_room(fp))
    return runner


def _planned(
    o: Options, ckpt: Any, config: BaseConfig, source: Path, parts: Parts, plan: Plan
) -> Any:
    """The runner of ``plan``: its policy, batch and compression (``runner.plan`` holds it)."""
    p = plan.policy
    o = replace(_compressed(o, plan.compress), compile=False, policy=None)
    if plan.resident:  # planned to fit: not planned again by other accounting
        runner = _resident(o, ckpt, config, parts, p)
    else:
        o = replace(
            o,
            percent=p.percent,
            batch_size=p.batch_size,
            num_batches=p.num_batches,
            max_context=plan.workload.context,
        )
        runner = _offloaded(o, ckpt, config, source, parts)
    runner.plan = plan
    return runner


def _compressed(o: Options, c: Compression | None) -> Options:
    return o if c == o.compression else o.with_compression(c)

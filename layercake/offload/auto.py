"""``policy="auto"``: measure (or recall) the machine, time the model's units, search a plan.

Used by ``layercake plan`` (which prints the plan) and by ``load`` / the engine commands when
budgets are given without ``--percent`` (which run it).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from layercake.checkpoint.parts import Parts
from layercake.config import BaseConfig
from layercake.errors import LayercakeError
from layercake.models import family
from layercake.offload.calibrate import unit_times
from layercake.offload.measure import Machine, measure_machine
from layercake.offload.planner import (
    BATCH_SIZES,
    Model,
    Plan,
    Workload,
    search,
    static_bytes,
)
from layercake.offload.policy import parse_bytes
from layercake.offload.store import storage_dtype
from layercake.quant import Compression


def workload_for(
    max_context: int | None, max_sequences: int | None, prompt_len: int | None = None
) -> Workload:
    """The workload an engine plans for: ``max_context`` tokens (default 256), ``prompt_len``
    of them prompt (default half), up to ``max_sequences`` (default 64) at once."""
    context = max_context or 256
    prompt = prompt_len or context // 2
    if not 1 <= prompt < context:
        raise LayercakeError(
            f"planning for prompts of {prompt} tokens in a context of {context}: the context "
            "must be longer than the prompt (--max-context)"
        )
    return Workload(prompt, context - prompt, max_sequences or 64)


def auto_plan(
    ckpt: Any,
    config: BaseConfig,
    parts: Parts,
    device: torch.device,
    dtype: torch.dtype,
    cpu_memory: str | int | None,
    device_memory: str | int | None,
    offload_dir: str | Path | None,
    workload: Workload,
    compress: list[Compression | None],
    batch_size: int | None = None,
    num_batches: int | None = None,
    remeasure: bool = False,
) -> Plan:
    """The fastest plan within the budgets for ``workload``; ``compress`` lists the weight
    compressions to consider (``[None]``: lossless only); ``batch_size`` / ``num_batches``
    fixed when given."""
    cpu_b, dev_b = parse_bytes(cpu_memory), parse_bytes(device_memory)
    if cpu_b is None and dev_b is None:
        raise LayercakeError("--policy auto needs a memory budget (--cpu-memory, --device-memory)")
    if device.type == "cuda" and dev_b is None:
        raise LayercakeError("--policy auto on CUDA needs --device-memory")
    for what, b in (("--batch-size", batch_size), ("--num-batches", num_batches)):
        if b is not None and b < 1:
            raise LayercakeError(f"{what} must be at least 1, got {b}")
    models, machine, base = planning_inputs(
        ckpt, config, parts, device, dtype, offload_dir, workload, compress, batch_size, remeasure
    )
    directory = Path(offload_dir).expanduser() if offload_dir is not None else None
    return search(
        models, machine, workload, cpu_b, dev_b, device.type == "cuda", base, directory,
        batch_size, num_batches,
    )  # fmt: skip


def planning_inputs(
    ckpt: Any, config: BaseConfig, parts: Parts, device: torch.device, dtype: torch.dtype,
    offload_dir: str | Path | None, workload: Workload, compress: list[Compression | None],
    batch_size: int | None = None, remeasure: bool = False,
) -> tuple[list[Model], Machine, int]:  # fmt: skip
    """(one ``Model`` per compression, the machine's rates, host bytes held already + safety)."""
    from layercake.offload import SAFETY, process_rss

    base = process_rss() + SAFETY  # before the probes allocate anything
    directory = Path(offload_dir).expanduser() if offload_dir is not None else None
    machine = measure_machine(directory, device.type, remeasure)
    sizes = [batch_size] if batch_size else [b for b in BATCH_SIZES if b <= workload.max_sequences]
    models = [
        _model(ckpt, config, parts, device, dtype, c, workload, sizes or [1], remeasure)
        for c in compress
    ]
    return models, machine, base


def auto_runner(
    ckpt: Any, config: BaseConfig, source: Path, parts: Parts, device: torch.device,
    dtype: torch.dtype, cpu_memory: str | int | None, device_memory: str | int | None,
    offload_dir: str | Path | None, batch_size: int | None, num_batches: int | None,
    workload: Workload, compress: list[Compression | None],
) -> Any:  # fmt: skip
    """The runner of the plan ``auto_plan`` picks (its ``plan`` attribute holds the plan)."""
    from layercake.offload import offload_runner, resident_runner

    plan = auto_plan(ckpt, config, parts, device, dtype, cpu_memory, device_memory,
                     offload_dir, workload, compress, batch_size, num_batches)  # fmt: skip
    p = plan.policy
    if plan.resident:  # planned to fit: not planned again by other accounting
        runner = resident_runner(ckpt, config, parts, device, dtype, p, plan.compress)
    else:
        runner = offload_runner(
            ckpt, config, source, parts, device, dtype, p.percent, cpu_memory, device_memory,
            offload_dir, p.batch_size, p.num_batches, workload.context, plan.compress,
        )  # fmt: skip
    runner.plan = plan
    return runner


def _model(ckpt: Any, config: BaseConfig, parts: Parts, device: torch.device,
           dtype: torch.dtype, compress: Compression | None, w: Workload, sizes: list[int],
           remeasure: bool) -> Model:  # fmt: skip
    from layercake.offload import footprint, streamed_units

    fam = family(config.model_type)
    meta, units = streamed_units(ckpt, config, parts, dtype, compress, device.type == "cpu")
    first = next(e for u in units for e in u.entries if len(e.shape) == 2)
    stored = storage_dtype(ckpt, first.src, dtype)
    times = unit_times(ckpt.config_dict(), stored, device, dtype, compress, sizes,
                       w.prompt_len, w.prompt_len + w.gen_len // 2, remeasure)  # fmt: skip
    touched = w.max_sequences * w.context
    static = static_bytes(ckpt, meta, units, fam.Model.tied, dtype, device, touched)
    kv_itemsize = float(dtype.itemsize)
    if compress is not None and compress.cache is not None:
        spec = compress.cache_spec(config.head_dim)
        kv_itemsize = spec.row_bytes(config.head_dim) / config.head_dim

    @functools.cache
    def fp(bs: int, nb: int, context: int) -> Any:
        return footprint(ckpt, config, parts, dtype, bs, nb, context, compress)

    return Model(units, config, static, times, compress, kv_itemsize, fp)


def plan_from_args(a: Any) -> Plan:
    """``layercake plan``'s options -> the plan (the model opened, nothing loaded)."""
    from layercake.checkpoint import open_checkpoint
    from layercake.checkpoint.locate import locate_model
    from layercake.checkpoint.parts import parse_parts
    from layercake.config import load_config
    from layercake.devices import parse_device, parse_dtype
    from layercake.llm import embedded_model_path
    from layercake.quant import compression

    if a.prompt_len < 1 or a.gen_len < 1 or a.max_sequences < 1:
        raise LayercakeError("--prompt-len, --gen-len and --max-sequences must be at least 1")
    if a.threads:
        torch.set_num_threads(a.threads)
    path = locate_model(a.model) if a.model else embedded_model_path()
    dev = parse_device(a.device)
    comp = compression(a.compress_weight, False, a.compress_bits, a.group_size)
    choices: list[Compression | None] = [comp]
    if a.allow_compression and comp is None:
        choices.append(compression(True, False, a.compress_bits, a.group_size))
    ckpt = open_checkpoint(path)
    config = load_config(ckpt.config_dict())
    return auto_plan(
        ckpt, config, parse_parts(a.parts, config.num_hidden_layers), dev,
        parse_dtype(a.dtype, dev), a.cpu_memory, a.device_memory, a.offload_dir,
        Workload(a.prompt_len, a.gen_len, a.max_sequences), choices, a.batch_size,
        a.num_batches, a.remeasure,
    )  # fmt: skip

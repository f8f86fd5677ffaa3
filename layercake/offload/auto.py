"""``policy="auto"``: measure (or recall) the machine, time the model's units, search a plan.

Used by ``layercake plan`` (which prints the plan) and by ``load`` / the engine commands when
budgets are given without ``--percent`` (which run it).
"""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from layercake.config import BaseConfig
from layercake.errors import LayercakeError
from layercake.models.parts import Parts, parse_parts
from layercake.offload.calibrate import unit_times
from layercake.offload.footprint import (
    footprint,
    held_bytes,
    kv_value_bytes,
    static_bytes,
    streamed_units,
)
from layercake.offload.measure import Machine, measure_machine
from layercake.offload.planner import (
    BATCH_SIZES,
    Model,
    Plan,
    Workload,
    search,
)
from layercake.offload.policy import parse_bytes
from layercake.offload.store import storage_dtype
from layercake.options import Options
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
    o: Options,
    ckpt: Any,
    config: BaseConfig,
    parts: Parts,
    workload: Workload | None = None,
    compress: list[Compression | None] | None = None,
    remeasure: bool = False,
) -> Plan:
    """The fastest plan within the budgets of the options ``o`` (a given ``batch_size`` /
    ``num_batches`` kept) for ``workload`` (default: ``workload_for`` the options);
    ``compress`` lists the weight compressions to consider (default: the options' own, and
    int4 weights too with ``allow_compression``)."""
    cpu_b, dev_b = parse_bytes(o.cpu_memory), parse_bytes(o.device_memory)
    if cpu_b is None and dev_b is None:
        raise LayercakeError("--policy auto needs a memory budget (--cpu-memory, --device-memory)")
    cuda = o.torch_device.type == "cuda"
    if cuda and dev_b is None:
        raise LayercakeError("--policy auto on CUDA needs --device-memory")
    for what, b in (("--batch-size", o.batch_size), ("--num-batches", o.num_batches)):
        if b is not None and b < 1:
            raise LayercakeError(f"{what} must be at least 1, got {b}")
    if workload is None:
        workload = workload_for(o.max_context, o.max_sequences, o.prompt_len)
    if compress is None:
        compress = [o.compression]
        if o.allow_compression and o.compression is None:
            compress.append(replace(o, compress_weight=True).compression)
    models, machine, base = planning_inputs(o, ckpt, config, parts, workload, compress, remeasure)
    directory = Path(o.offload_dir).expanduser() if o.offload_dir is not None else None
    return search(
        models,
        machine,
        workload,
        cpu_b,
        dev_b,
        cuda,
        base,
        directory,
        o.batch_size,
        o.num_batches,
    )


def planning_inputs(
    o: Options,
    ckpt: Any,
    config: BaseConfig,
    parts: Parts,
    workload: Workload,
    compress: list[Compression | None],
    remeasure: bool = False,
) -> tuple[list[Model], Machine, int]:
    """(one ``Model`` per compression, the machine's rates, host bytes held already + safety)
    for the device, dtype, offload dir and batch size of the options ``o``."""
    base = held_bytes()  # before the probes allocate anything
    directory = Path(o.offload_dir).expanduser() if o.offload_dir is not None else None
    machine = measure_machine(directory, o.torch_device.type, remeasure)
    if o.batch_size:
        sizes = [o.batch_size]
    else:
        sizes = [b for b in BATCH_SIZES if b <= workload.max_sequences] or [1]
    models = [
        _model(ckpt, config, parts, o.torch_device, o.torch_dtype, c, workload, sizes, remeasure)
        for c in compress
    ]
    return models, machine, base


def _model(ckpt: Any, config: BaseConfig, parts: Parts, device: torch.device,
           dtype: torch.dtype, compress: Compression | None, w: Workload, sizes: list[int],
           remeasure: bool) -> Model:  # fmt: skip
    meta, units = streamed_units(ckpt, config, parts, dtype, compress, device.type == "cpu")
    first = next(e for u in units for e in u.entries if len(e.shape) == 2)
    stored = storage_dtype(ckpt, first.src, dtype)
    times = unit_times(ckpt.config_dict(), stored, device, dtype, compress, sizes,
                       w.prompt_len, w.prompt_len + w.gen_len // 2, remeasure)  # fmt: skip
    touched = w.max_sequences * w.context
    static = static_bytes(ckpt, meta, units, dtype, device, touched)
    spec = compress.cache_spec(config.head_dim) if compress is not None else None
    kv_itemsize = kv_value_bytes(dtype, spec, config.head_dim)

    @functools.cache
    def fp(bs: int, nb: int, context: int) -> Any:
        return footprint(ckpt, config, parts, dtype, bs, nb, context, compress)

    return Model(units, config, static, times, compress, kv_itemsize, fp)


def plan_from_args(a: Any) -> Plan:
    """``layercake plan``'s options -> the plan (the model opened, nothing loaded)."""
    from layercake.checkpoint import open_checkpoint
    from layercake.checkpoint.locate import locate_model
    from layercake.config import load_config
    from layercake.embedded import embedded_model_path

    if a.prompt_len < 1 or a.gen_len < 1 or a.max_sequences < 1:
        raise LayercakeError("--prompt-len, --gen-len and --max-sequences must be at least 1")
    o = Options.from_args(a, prompt_len=None, max_sequences=None)
    if o.threads:
        torch.set_num_threads(o.threads)
    path = locate_model(a.model) if a.model else embedded_model_path()
    ckpt = open_checkpoint(path)
    config = load_config(ckpt.config_dict())
    parts = parse_parts(o.parts, config.num_hidden_layers)
    w = Workload(a.prompt_len, a.gen_len, a.max_sequences)
    return auto_plan(o, ckpt, config, parts, w, remeasure=a.remeasure)

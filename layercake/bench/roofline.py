"""How close a run came to this machine's limits: per decode step, the weight bytes read from
RAM and from disk and the matmul FLOPs, each against its independently measured rate.

A step cannot take less than ``max(RAM bytes / RAM bandwidth, disk bytes / disk rate, FLOPs /
matmul peak at its row count)``; ``bound_fraction`` is that time over the measured step time (1
would be the machine's limit, above 1 a limit measured too low). The per-resource fractions say
which limit the run came closest to.
"""

from __future__ import annotations

from typing import Any

import torch

from layercake.bench.limits import Limits


def linear_params(runner: Any) -> int | None:
    """Weights taking part in matmuls (2 FLOPs each per token; embedding lookups are not
    matmuls), or None for a runner whose weights live elsewhere (a pipeline)."""
    if hasattr(runner, "units"):  # offloaded: every unit's weights, the head's slabs included
        return sum(e.numel for u in runner.units for e in u.entries if len(e.shape) == 2)
    if getattr(runner, "slices", None) is None:
        return None
    shapes: dict[int, int] = {}
    # a runner with its own step (layers + head, fused weights) runs those, else its slices
    roots = (runner.layers, runner.head) if hasattr(runner, "head") else (runner.slices,)
    for root in roots:
        _linears(root, shapes, 0)
    return sum(shapes.values())


def _linears(obj: Any, out: dict[int, int], depth: int) -> None:
    """in x out of every linear module and packed weight (an object with ``linear`` and a 2-D
    ``shape``) reachable from ``obj``, each once."""
    if depth > 8 or obj is None or isinstance(obj, (str, int, float, bool, torch.Tensor)):
        return
    if isinstance(obj, torch.nn.Module):
        if hasattr(obj, "in_features") and hasattr(obj, "out_features"):
            out[id(obj)] = obj.in_features * obj.out_features
            return
        for v in [*(v for k, v in vars(obj).items() if not k.startswith("_")), *obj.children()]:
            _linears(v, out, depth + 1)
        return
    if isinstance(obj, (list, tuple)):
        for v in obj:
            _linears(v, out, depth + 1)
        return
    if hasattr(obj, "linear") and len(getattr(obj, "shape", ())) == 2:
        out[id(obj)] = obj.shape[0] * obj.shape[1]
        return
    if hasattr(obj, "__dict__") and type(obj).__module__.startswith("layercake"):
        for v in vars(obj).values():
            _linears(v, out, depth + 1)


def head_params(runner: Any) -> int:
    """The output head's share of ``linear_params``: a prefill computes it for each row's last
    position only."""
    if hasattr(runner, "units"):
        return sum(e.numel for u in runner.units if u.kind == "head" for e in u.entries
                   if len(e.shape) == 2)  # fmt: skip
    shapes: dict[int, int] = {}
    if hasattr(runner, "head"):
        _linears(runner.head, shapes, 0)
    else:
        for s in getattr(runner, "slices", None) or []:
            for name, m in s.named_modules():
                if name.endswith("lm_head"):
                    _linears(m, shapes, 0)
    return sum(shapes.values())


def weight_bytes(runner: Any) -> int | None:
    """Bytes of weights one decode step reads (every weight once, as held: fp32, bf16, int4
    blocks), the embedding table left out (a step reads a row per sequence of it)."""
    if hasattr(runner, "units"):  # offloaded: staged or resident, compute reads each once
        return sum(u.nbytes for u in runner.units)
    roots = [getattr(runner, n, None) for n in ("layers", "head", "norm", "slices")]
    if roots[-1] is None:
        return None
    seen: dict[int, int] = {}
    for r in roots:
        _walk(r, seen, depth=0)
    return sum(seen.values())


def _walk(obj: Any, seen: dict[int, int], depth: int) -> bool:
    """Tensors reachable from modules, containers and weight objects (packed forms are plain
    objects holding tensors), each counted once. True when an opaque tensor (MKL's packed
    layout, whose reported size is not its memory) was met: the caller counts the module."""
    if depth > 8 or obj is None or isinstance(obj, (str, int, float, bool, torch.nn.Embedding)):
        return False
    if isinstance(obj, torch.Tensor):
        if obj.device.type == "meta":
            return False
        try:  # an expanded stub holds one element: never more than its storage
            nbytes = min(obj.numel() * obj.element_size(), obj.untyped_storage().nbytes())
        except (NotImplementedError, RuntimeError):
            return True
        seen[obj.data_ptr()] = nbytes  # one tensor reached twice (tied weights) counts once
        return False
    if isinstance(obj, torch.nn.Module):
        opaque = False
        for t in (*obj.parameters(recurse=False), *obj.buffers(recurse=False)):
            opaque |= _walk(t, seen, depth + 1)
        for k, v in vars(obj).items():
            if not k.startswith("_"):
                opaque |= _walk(v, seen, depth + 1)
        if opaque and hasattr(obj, "in_features"):  # MKL packs fp32: 4 bytes a weight
            seen[id(obj)] = 4 * obj.in_features * obj.out_features
            opaque = False
        for m in obj.children():
            opaque |= _walk(m, seen, depth + 1)
        return opaque
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return any([_walk(v, seen, depth + 1) for v in obj])
    if hasattr(obj, "__dict__") and type(obj).__module__.startswith("layercake"):
        opaque = any([_walk(v, seen, depth + 1) for v in vars(obj).values()])
        if opaque and getattr(obj, "form", None) == "mkl":  # MKL packs fp32: 4 bytes a weight
            seen[id(obj)] = 4 * obj.shape[0] * obj.shape[1]
            return False
        return opaque
    return False


def roofline(run: dict, limits: Limits) -> dict:
    """Fractions of the limits a run reached. ``run``: batch, prompt_len, prefill_s,
    decode_s, decode_steps, params, ram_bytes_per_step, disk_bytes_per_step (decode)."""
    B, P, steps = run["batch"], run["prompt_len"], run["decode_steps"]
    out: dict[str, Any] = {}
    params = run.get("params")
    if params and run["prefill_s"] > 0:
        rows = B * P  # every layer on every prompt token, the head on each row's last one
        head = run.get("head_params", 0)
        gflops = 2 * ((params - head) * rows + head * B) / run["prefill_s"] / 1e9
        out.update(prefill_gflops=round(gflops, 1), prefill_matmul_peak=limits.matmul_peak(rows),
                   prefill_matmul_fraction=round(gflops / limits.matmul_peak(rows), 3))  # fmt: skip
    if steps <= 0 or run["decode_s"] <= 0:
        return out
    step = run["decode_s"] / steps
    bound = 0.0
    if params:
        gflops = 2 * params * B / step / 1e9
        peak = limits.matmul_peak(B)
        out.update(decode_gflops=round(gflops, 1), decode_matmul_peak=peak,
                   decode_matmul_fraction=round(gflops / peak, 3))  # fmt: skip
        bound = max(bound, 2 * params * B / (peak * 1e9))
    ram = run.get("ram_bytes_per_step")
    if ram:
        gbps = ram / step / 1e9
        out.update(ram_gbps=round(gbps, 2), ram_fraction=round(gbps / limits.ram_gbps, 3))
        bound = max(bound, ram / (limits.ram_gbps * 1e9))
    disk = run.get("disk_bytes_per_step")
    if disk and limits.disk_gbps > 0:
        gbps = disk / step / 1e9
        out.update(disk_gbps=round(gbps, 3), disk_fraction=round(gbps / limits.disk_gbps, 3))
        bound = max(bound, disk / (limits.disk_gbps * 1e9))
    if bound > 0:
        out["bound_fraction"] = round(bound / step, 3)
    over = [k for k, v in out.items() if k.endswith("fraction") and v > 1]
    if over:  # a rate measured too low: say so, never report it as a result
        out["limit_problem"] = f"{', '.join(over)} above 1: a limit measured too low; remeasure"
    return out


def format_roofline(r: dict, limits: Limits, batch: int) -> str:
    """One line: each decode-step resource's rate against this machine's limit."""
    parts = []
    if "ram_gbps" in r:
        ram = f"{r['ram_gbps']:.1f}/{limits.ram_gbps:.1f}"
        parts.append(f"RAM {ram} GB/s ({r['ram_fraction']:.2f})")
    if "disk_gbps" in r:
        parts.append(
            f"disk {r['disk_gbps']:.2f}/{limits.disk_gbps:.2f} GB/s ({r['disk_fraction']:.2f})"
        )
    if "decode_gflops" in r:
        parts.append(
            f"matmul {r['decode_gflops']:.0f}/{r['decode_matmul_peak']:.0f} GFLOP/s at {batch} "
            f"row{'s' * (batch != 1)} ({r['decode_matmul_fraction']:.2f})"
        )
    line = "roofline: decode " + ", ".join(parts) if parts else "roofline: no decode steps"
    if "bound_fraction" in r:
        line += f"; step at {r['bound_fraction']:.2f} of its bound"
    if "prefill_gflops" in r:
        line += (
            f"; prefill matmul {r['prefill_gflops']:.0f}/{r['prefill_matmul_peak']:.0f} GFLOP/s "
            f"({r['prefill_matmul_fraction']:.2f})"
        )
    return line + (f" [{r['limit_problem']}]" if "limit_problem" in r else "")


def run_roofline(llm: Any, stats: Any, limits: Limits, disk_bytes_decode: int = 0) -> dict:
    """The roofline of ``llm``'s last generation (``stats``: its GenerationStats)."""
    run = dict(
        batch=stats.batch_size,
        prompt_len=stats.prompt_tokens // max(1, stats.batch_size),
        prefill_s=stats.prefill_s,
        decode_s=stats.decode_s,
        decode_steps=stats.decode_steps,
        params=linear_params(llm.runner),
        head_params=head_params(llm.runner),
        ram_bytes_per_step=weight_bytes(llm.runner),
        disk_bytes_per_step=disk_bytes_decode / stats.decode_steps if stats.decode_steps else 0,
    )
    return roofline(run, limits)


def roofline_line(llm: Any, stats: Any) -> str:
    """The roofline line ``generate -v`` prints (limits measured once, then cached)."""
    from layercake.bench.limits import machine_limits

    r = llm.runner
    limits = machine_limits(getattr(r, "offload_dir", None))
    disk = getattr(r, "disk_bytes", 0) * stats.decode_steps  # units' disk rows, every step
    return format_roofline(run_roofline(llm, stats, limits, disk), limits, stats.batch_size)


_KINDS = {"LocalRunner": "in memory", "OffloadRunner": "offload"}


def runner_path(runner: Any) -> str:
    """Which path runs the model: the runner's own ``describe()`` where it has one, else its
    kind, device and dtype (and ``compiled`` where it compiles its step)."""
    describe = getattr(runner, "describe", None)
    if callable(describe):
        return str(describe())
    kind = type(runner).__name__
    words = [_KINDS.get(kind, kind), str(getattr(runner, "device", "")).strip()]
    dtype = getattr(runner, "dtype", None)
    if dtype is not None:
        words.append(str(dtype).removeprefix("torch."))
    if getattr(runner, "compiled", False) or getattr(runner, "_step", None) is not None:
        words.append("compiled")
    return ", ".join(w for w in words if w)

"""Per-unit compute times of a model on this machine, measured through the offload runner itself.

The planner's compute terms are not FLOP counts over a peak: they are the time the executor really
takes for one decoder layer and for rows of the output head, at each micro-batch size, for prefill
and for decode, with weights converted (or dequantized, compressed) from host RAM exactly as when
they stream. A one-layer checkpoint of the model's shapes (random weights, its stored dtype) and a
head-only one are written to a temporary directory and run by ``OffloadRunner``, so whatever the
executor does (a bf16 -> fp32 copy, a dequantization, an int4pack matmul) is what is timed.

Results are cached next to the machine's rates (``measure.py``), keyed by the machine, the layer's
shapes, the compression, the lengths and a digest of layercake's sources (a changed executor is
timed again); only batch sizes not yet measured are run.
"""

from __future__ import annotations

import functools
import hashlib
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from layercake.config import BaseConfig, load_config
from layercake.models import family
from layercake.models.parts import Parts
from layercake.offload.measure import load_cache, machine_key, save_cache
from layercake.progress import track
from layercake.quant import Compression

HEAD_PROBE_BYTES = 64 * 2**20  # one head slab of the probe (storage dtype)
BUDGET_S = 3.0  # repeats of one measurement stop after this long (and two samples)


@dataclass(frozen=True)
class UnitTimes:
    """Seconds, for one micro-batch of ``bs`` sequences (keys: bs).

    ``layer_load_s``: making one layer's weights ready (convert / dequantize / copy to the
    device), once per layer per step whatever the number of micro-batches; ``decode_layer_s``
    and ``prefill_layer_s``: one micro-batch through one layer; head terms are per vocabulary
    row (the head streams in slabs of rows)."""

    layer_load_s: float
    head_load_s_per_row: float
    decode_layer_s: dict[int, float]
    prefill_layer_s: dict[int, float]
    head_s_per_row: dict[int, float]


@functools.cache
def code_digest() -> str:
    """A digest of layercake's own sources: times measured through the runner are measured
    again once its code changes (a new kernel, a new executor)."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def _key(cfg: dict, stored: torch.dtype, dtype: torch.dtype, device: torch.device,
         compress: Compression | None, prompt_len: int, decode_len: int) -> str:  # fmt: skip
    shape = {k: v for k, v in cfg.items() if k not in ("num_hidden_layers", "vocab_size")}
    ident = json.dumps([shape, str(stored), str(dtype), str(compress), prompt_len, decode_len,
                        code_digest()], sort_keys=True, default=str)  # fmt: skip
    machine = machine_key(device.type, torch.get_num_threads(), None)
    return f"{machine}|{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def unit_times(
    cfg: dict[str, Any],
    stored: torch.dtype,
    device: torch.device,
    dtype: torch.dtype,
    compress: Compression | None,
    batch_sizes: list[int],
    prompt_len: int,
    decode_len: int,
    remeasure: bool = False,
) -> UnitTimes:
    """Times of the model of config dict ``cfg`` (stored in ``stored``), from the cache where
    measured before; ``decode_len`` is the cache length decode steps are timed at."""
    key = _key(cfg, stored, dtype, device, compress, prompt_len, decode_len)
    data = load_cache()
    entry = {} if remeasure else data.get("units", {}).get(key, {})
    want = sorted(set(batch_sizes) - {int(b) for b in entry.get("decode_layer_s", {})})
    if want or not entry:
        new = _measure(cfg, stored, device, dtype, compress, want or [1], prompt_len, decode_len)
        for field in ("decode_layer_s", "prefill_layer_s", "head_s_per_row"):
            entry.setdefault(field, {}).update({str(b): v for b, v in new[field].items()})
        for field in ("layer_load_s", "head_load_s_per_row"):
            entry.setdefault(field, new[field])
        data.setdefault("units", {})[key] = entry
        save_cache(data)

    def ints(d: dict) -> dict[int, float]:
        """Per-batch-size times with the noise of a busy moment taken out where it shows: more
        sequences never take less time, so a size's time is at most any larger size's."""
        out, least = {}, float("inf")
        for b in sorted((int(k) for k in d), reverse=True):
            least = min(least, d[str(b)])
            out[b] = least
        return dict(sorted(out.items()))

    return UnitTimes(
        entry["layer_load_s"],
        entry["head_load_s_per_row"],
        ints(entry["decode_layer_s"]),
        ints(entry["prefill_layer_s"]),
        ints(entry["head_s_per_row"]),
    )


def _probe_checkpoint(directory: Path, cfg: dict, stored: torch.dtype) -> tuple[Path, int]:
    """A one-layer, head-only-vocabulary checkpoint of ``cfg``'s shapes; returns (path, rows of
    its head). Matrices random (std 0.02), vectors ones: no denormals, realistic speed."""
    from safetensors.torch import save_file

    hidden = int(cfg["hidden_size"])
    rows = max(1, min(int(cfg["vocab_size"]), HEAD_PROBE_BYTES // (hidden * stored.itemsize)))
    rows -= rows % 64 if rows > 64 else 0  # whole groups for compressed heads
    probe = dict(cfg, num_hidden_layers=1, vocab_size=rows, tie_word_embeddings=False)
    config = load_config(probe)
    fam = family(config.model_type)
    tensors = {}
    gen = torch.Generator().manual_seed(0)
    for parts in (Parts(False, (0,), False), Parts(False, (), True)):
        with torch.device("meta"):
            model = fam.Model(config, parts)
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                t = torch.randn(p.shape, generator=gen) * 0.02
            else:
                t = torch.ones(p.shape)
            tensors[name] = t.to(stored)
    save_file(tensors, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(probe, default=str))
    return directory, rows


def _measure(cfg: dict, stored: torch.dtype, device: torch.device, dtype: torch.dtype,
             compress: Compression | None, batch_sizes: list[int], prompt_len: int,
             decode_len: int) -> dict:  # fmt: skip
    from layercake.checkpoint import open_checkpoint
    from layercake.options import Options
    from layercake.runners import build_runner

    out: dict[str, Any] = {"decode_layer_s": {}, "prefill_layer_s": {}, "head_s_per_row": {}}
    with tempfile.TemporaryDirectory(prefix="layercake-probe-") as tmp:
        path, rows = _probe_checkpoint(Path(tmp), cfg, stored)
        ckpt = open_checkpoint(path)
        config = load_config(ckpt.config_dict())
        # every weight in host RAM in its storage form: each use converts it, as when streamed
        o = Options(device=device, dtype=dtype, percent=[0, 100, 100, 0, 100, 0])
        o = o.with_compression(compress)
        layer = build_runner(o, ckpt, config, path, Parts(False, (0,), False))
        head = build_runner(o, ckpt, config, path, Parts(False, (), True))
        load_l, step_l = _load_and_step(layer, config, device, dtype, 1, decode_len)
        load_h, _ = _load_and_step(head, config, device, dtype, 1, 1)
        out["layer_load_s"], out["head_load_s_per_row"] = load_l, load_h / rows
        for bs in track(batch_sizes, "timing the model's layers (once; cached)", unit="sizes"):
            dec = _forward_s(layer, config, device, dtype, bs, 1, 1, decode_len, repeats=9)
            out["decode_layer_s"][bs] = step_l if bs == 1 else max(step_l, dec - load_l)
            pre = _forward_s(layer, config, device, dtype, bs, 1, prompt_len, 0, repeats=3)
            out["prefill_layer_s"][bs] = max(0.0, pre - load_l)
            hd = _forward_s(head, config, device, dtype, bs, 1, 1, 0, repeats=7)
            out["head_s_per_row"][bs] = max(0.0, hd - load_h) / rows
        del layer, head
        ckpt = None
    return out


def _load_and_step(runner: Any, config: BaseConfig, device: torch.device, dtype: torch.dtype,
                   bs: int, past: int) -> tuple[float, float]:  # fmt: skip
    """(load, one micro-batch): one forward of one micro-batch and one of four, all decoding
    ``bs`` rows; a third of the difference is a micro-batch's compute, the rest of the first
    the per-step load."""
    one = _forward_s(runner, config, device, dtype, bs, 1, 1, past, repeats=9)
    four = _forward_s(runner, config, device, dtype, bs, 4, 1, past, repeats=7)
    step = max(0.0, (four - one) / 3)
    return max(0.0, one - step), step


def _forward_s(runner: Any, config: BaseConfig, device: torch.device, dtype: torch.dtype,
               bs: int, nb: int, T: int, past: int, repeats: int) -> float:  # fmt: skip
    """Seconds of one forward of ``nb`` micro-batches of ``bs`` rows, ``T`` new tokens each
    after ``past`` cached ones (the median of up to ``repeats``)."""
    B = bs * nb
    runner.policy = replace(runner.policy, batch_size=bs, num_batches=nb)
    cache = runner.new_cache(B, past + T)
    x = torch.randn(B, T, config.hidden_size, dtype=dtype, device=device)
    positions = torch.arange(past, past + T, device=device).expand(B, T)

    times: list[float] = []
    while len(times) < repeats and (len(times) < 2 or sum(times) < BUDGET_S):
        cache.length = past
        cache.valid[:, :past] = True
        t0 = time.perf_counter()
        runner.forward(x, positions, cache, last_only=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    # the median, not the fastest: a run meets this machine's typical moments (it is shared),
    # not its best; the first sample touches fresh buffers and is left out
    return statistics.median(times[1:] or times)

"""Where weights, KV cache and activations live: FlexGen's six percentages or byte budgets.

Tiers, fastest first: ``device`` (the compute device; on a CPU-only machine, host RAM holding
weights already in the compute dtype), ``cpu`` (host RAM in the storage dtype, pinned when the
device is CUDA) and ``disk`` (files in ``offload_dir``, read with large direct reads). Weights are
placed by bytes: every streamed unit (a layer, or a slab of the output head) keeps the same share
of its bytes in each tier, so 25 % and 30 % really differ by 5 % of the model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from layercake.errors import LayercakeError

if TYPE_CHECKING:  # a type only: footprint computes with the policies defined here
    from layercake.offload.footprint import Footprint

_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_IUNITS = {"KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}


def parse_bytes(value: str | int | float | None) -> int | None:
    """``"1.6GB"``, ``"800MiB"``, ``"2G"``, ``1000000`` -> bytes (decimal units unless ``i``)."""
    if value is None or isinstance(value, int | float):
        return None if value is None else int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT][iI]?)?[bB]?\s*", value)
    if not m:
        raise LayercakeError(f"cannot read {value!r} as a size: use e.g. 1600MB, 1.5GiB, 2G")
    unit = (m.group(2) or "").upper()
    return int(float(m.group(1)) * (_IUNITS.get(unit) or _UNITS[unit]))


@dataclass(frozen=True)
class Policy:
    """Percentages (0-100) per tier; disk gets what device and cpu leave.

    ``batch_size`` sequences form a micro-batch; ``num_batches`` micro-batches form the block that
    each loaded layer serves before the next one (the effective batch is their product)."""

    w_device: float = 100.0
    w_cpu: float = 0.0
    cache_device: float = 100.0
    cache_cpu: float = 0.0
    act_device: float = 100.0
    act_cpu: float = 0.0
    batch_size: int = 32
    num_batches: int = 1

    def __post_init__(self) -> None:
        for what, dev, cpu in (
            ("weights", self.w_device, self.w_cpu),
            ("KV cache", self.cache_device, self.cache_cpu),
            ("activations", self.act_device, self.act_cpu),
        ):
            if not (0 <= dev <= 100 and 0 <= cpu <= 100 and dev + cpu <= 100 + 1e-9):
                raise LayercakeError(
                    f"--percent for {what}: device {dev:g} % and cpu {cpu:g} % must each be in "
                    "0-100 and add up to at most 100 (disk gets the rest)"
                )
        if self.batch_size < 1 or self.num_batches < 1:
            raise LayercakeError("batch_size and num_batches must be at least 1")

    @classmethod
    def from_percent(cls, percent: tuple[float, ...] | list[float], **kw: int) -> Policy:
        if len(percent) != 6:
            raise LayercakeError(
                "--percent takes six numbers: W_DEV W_CPU KV_DEV KV_CPU ACT_DEV ACT_CPU "
                f"(got {len(percent)})"
            )
        return cls(*(float(p) for p in percent), **kw)

    @property
    def block_size(self) -> int:
        return self.batch_size * self.num_batches

    @property
    def w_disk(self) -> float:
        return max(0.0, 100.0 - self.w_device - self.w_cpu)

    @property
    def cache_disk(self) -> float:
        return max(0.0, 100.0 - self.cache_device - self.cache_cpu)

    @property
    def act_disk(self) -> float:
        return max(0.0, 100.0 - self.act_device - self.act_cpu)

    @property
    def percent(self) -> tuple[float, ...]:
        return (
            self.w_device,
            self.w_cpu,
            self.cache_device,
            self.cache_cpu,
            self.act_device,
            self.act_cpu,
        )

    def __str__(self) -> str:
        p = " ".join(f"{x:g}" for x in self.percent)
        return f"percent {p}, batch {self.batch_size} x {self.num_batches}"


def split_bytes(total: int, policy_dev: float, policy_cpu: float) -> tuple[int, int, int]:
    """``total`` bytes split by percentages into (device, cpu, disk) byte counts."""
    dev = int(total * policy_dev / 100)
    cpu = min(total - dev, int(total * policy_cpu / 100))
    return dev, cpu, total - dev - cpu


# The loader's ring of staging buffers for units' disk rows: one being computed on, two being read
# ahead. With two (one read ahead) a decode step whose reads take nearly as long as its compute
# still waited for weights; with three it waits none (the README's "Offloading" has the figures).
# The third costs a unit's disk share of RAM, taken from the resident weights.
STAGING_SLOTS = 3
# routed experts (``offload.experts``) have a ring of their own: their reads are queued as soon as
# a router has chosen them (or before, at large blocks), and a ring deeper than three keeps the
# disk busy while a layer's attention computes; up to EXPERT_SLOTS small experts, as many as
# EXPERT_RING_BYTES holds, never fewer than STAGING_SLOTS. Eight until a layer's experts ran as
# their reads arrive (the held ones all first: the ring had to cover their compute); four since,
# the other four experts' bytes held in RAM (README, "Mixture of experts", moe7)
EXPERT_SLOTS = 4
EXPERT_RING_BYTES = 128 * 2**20


def expert_slots(expert_bytes: int) -> int:
    """Buffers in the routed experts' staging ring for experts of ``expert_bytes``."""
    return max(STAGING_SLOTS, min(EXPERT_SLOTS, EXPERT_RING_BYTES // max(1, expert_bytes)))


# compressed weights held resident dequantize this much at a time (``quant.Workspace``)
RESIDENT_SCRATCH = 64 * 2**20


def plan_policy(
    fp: Footprint,
    cpu_memory: int | None,
    device_memory: int | None,
    cuda: bool,
    batch_size: int,
    num_batches: int,
) -> Policy:
    """Percentages from byte budgets: what does not fit goes to disk.

    On a CPU-only machine the device tier is host RAM too: weights stay in the compute dtype
    (no conversion per step) when all of them fit that way, else in the storage dtype (twice as
    many fit, converted as they are used). The KV cache gets RAM before the weights' share."""
    kw = {"batch_size": batch_size, "num_batches": num_batches}
    if not cuda:
        budget = (cpu_memory or 0) + (device_memory or 0)
        fixed = fp.activations + fp.work + fp.headroom
        resident = fp.weights * fp.compute_ratio + fp.activations + fp.kv + fp.headroom
        if fp.scratch:  # compressed, resident: dequantized a chunk at a time
            resident += min(fp.scratch, RESIDENT_SCRATCH)
        if resident <= budget:
            return Policy(100, 0, 100, 0, 100, 0, **kw)
        return _split(fp, budget, fixed, **kw)
    # CUDA: device memory holds compute buffers, cache and what weights fit; host RAM the rest
    scratch = fp.scratch or int(fp.max_unit * fp.compute_ratio)
    dev_budget = (device_memory or 0) - fp.activations - scratch
    if dev_budget < 0:
        raise LayercakeError(
            f"--device-memory {device_memory / 1e9:.2f} GB is too small: one layer's buffers and "
            f"activations need {(fp.activations + scratch) / 1e9:.2f} GB"
        )
    kv_dev = min(100.0, 100.0 * dev_budget / fp.kv) if fp.kv else 100.0
    dev_budget = max(0, dev_budget - fp.kv)
    w_dev = min(100.0, 100.0 * dev_budget / (fp.weights * fp.compute_ratio))
    rest = fp.weights * (1 - w_dev / 100)
    host = cpu_memory if cpu_memory is not None else 0
    staging = STAGING_SLOTS * fp.max_unit
    w_cpu = min(100.0 - w_dev, 100.0 * max(0, host - staging) / fp.weights)
    if w_cpu < 0 or (rest > 0 and cpu_memory is not None and host < staging):
        raise LayercakeError(
            f"--cpu-memory is too small to stream from disk: staging needs {staging / 1e9:.2f} GB"
        )
    return Policy(w_dev, w_cpu, kv_dev, 100 - kv_dev, 100, 0, **kw)


def _split(fp: Footprint, budget: int, fixed: int, **kw: int) -> Policy:
    """CPU budget: KV cache first, then weights in the storage dtype; the rest streams from disk
    through ``STAGING_SLOTS`` staging buffers of a unit's disk share each."""
    S = STAGING_SLOTS
    kv_ram = min(fp.kv, max(0, budget - fixed - S * fp.max_unit))
    kv_pct = 100.0 * kv_ram / fp.kv if fp.kv else 100.0
    room = budget - fixed - kv_ram
    # resident r of W, disk d = W - r, staging S * max_unit * d / W: r + S U d / W <= room
    W, U = fp.weights, fp.max_unit
    minimum = fixed + S * U
    if not fp.layers_stream(min(W, room)):  # only routed experts stream, through their ring
        return Policy(0, 100.0 * min(W, room) / W, kv_pct, 0, 100, 0, **kw)
    if room < S * U:
        raise LayercakeError(
            f"memory budget {budget / 1e9:.2f} GB is too small: streaming even one layer at a "
            f"time needs at least {minimum / 1e9:.2f} GB (buffers and activations for batch "
            f"{kw['batch_size']} x {kw['num_batches']})"
        )
    r = min(W, (room - S * U) / (1 - S * U / W)) if W > S * U else 0
    return Policy(0, 100.0 * r / W, kv_pct, 0, 100, 0, **kw)

"""Where an offloaded model's KV cache lives, layer by layer: the compute device, host RAM
(pinned on CUDA) or files in the offload dir streamed by direct I/O (``kvdisk``); a compressed
cache's disk layers are mapped files the kernel pages."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from layercake.config import BaseConfig
from layercake.errors import LayercakeError
from layercake.kv_cache import KVCache, quantized_layers
from layercake.offload.footprint import kv_bytes, kv_value_bytes
from layercake.offload.kvdisk import DiskKV
from layercake.offload.policy import Policy
from layercake.offload.tiers import file_tensor
from layercake.quant import QuantSpec


class KVTiers:
    """Makes caches placed by a policy (or a byte budget for the device tier) and tells which
    layers of a cache stream from disk."""

    def __init__(
        self,
        config: BaseConfig,
        layers: list[int],
        policy: Policy,
        device: torch.device,
        dtype: torch.dtype,
        offload_dir: Path | None,
        budget: int | None,
        quant: QuantSpec | None,
    ) -> None:
        self.config, self.layers, self.policy = config, layers, policy
        self.device, self.dtype, self.offload_dir = device, dtype, offload_dir
        self.budget, self.quant = budget, quant
        self.cuda = device.type == "cuda"
        self.caches = 0
        self.on_disk = 0  # layers of the latest cache on disk
        # the files of the latest caches; an older cache's layers are still maps of their files
        self.files: list[dict[int, tuple[DiskKV, DiskKV]]] = []

    def counts(self, per_layer: int) -> tuple[int, int]:
        """(layers on the compute device, layers held in RAM or on it): the first layers on the
        device, then (CUDA) pinned host RAM, then disk."""
        n, p = len(self.layers), self.policy
        held = round(n * (p.cache_device + p.cache_cpu) / 100)
        if self.cuda:
            on_dev = round(n * p.cache_device / 100)
            if self.budget is not None:
                on_dev = min(n, self.budget // max(1, per_layer))
            return on_dev, max(held, on_dev)
        if self.budget is not None:
            held = min(n, self.budget // max(1, per_layer))
        return held, held

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """The cache of held layers in their tiers: the first layers on the device, then host
        RAM, then files in the offload dir (streamed by direct I/O; a compressed cache's files
        are mapped: the kernel pages them)."""
        c = self.config
        shape = (batch, c.num_key_value_heads, capacity, c.head_dim)
        per_layer = kv_bytes(
            c, batch, capacity, 1, kv_value_bytes(self.dtype, self.quant, c.head_dim)
        )
        n = len(self.layers)
        in_ram, held = self.counts(per_layer)
        if held < n and self.offload_dir is None:
            raise LayercakeError("the policy puts KV cache on disk: give an offload dir")
        if in_ram < n and self.cuda and self.quant is not None:
            raise LayercakeError("a compressed KV cache off the GPU is not supported on CUDA yet")
        keys, values = {}, {}
        self.caches += 1
        if self.quant is not None:
            pos = {i: k for k, i in enumerate(self.layers)}

            def new(i: int, part: str, s: tuple[int, ...], dt: torch.dtype) -> torch.Tensor:
                if pos[i] < in_ram:
                    return torch.zeros(s, dtype=dt, device=self.device)
                return file_tensor(self.offload_dir / "kv" / f"{self.caches}-{part}{i}", s, dt)

            keys, values = quantized_layers(
                self.layers, shape, self.quant, self.dtype, self.device, new
            )
        files: dict[int, tuple[DiskKV, DiskKV]] = {}
        for pos, i in enumerate(self.layers if self.quant is None else ()):
            if pos < in_ram:
                keys[i] = torch.zeros(shape, dtype=self.dtype, device=self.device)
                values[i] = torch.zeros(shape, dtype=self.dtype, device=self.device)
            elif pos < held:  # CUDA: host RAM, pinned for asynchronous copies
                keys[i] = torch.zeros(shape, dtype=self.dtype).pin_memory()
                values[i] = torch.zeros(shape, dtype=self.dtype).pin_memory()
            else:  # streamed by direct I/O in forward (see kvdisk)
                name = self.offload_dir / "kv" / f"{os.getpid()}-{id(self)}-{self.caches}"
                files[i] = tuple(DiskKV.create(Path(f"{name}-{p}{i}"), shape, self.dtype)
                                 for p in "kv")  # fmt: skip
                keys[i], values[i] = files[i][0].tensor, files[i][1].tensor
        self.files = [*self.files[-1:], files]
        valid = torch.zeros(batch, capacity, dtype=torch.bool, device=self.device)
        self.on_disk = n - held
        return KVCache(keys, values, valid, 0, getattr(c, "sliding_window", None))

    def streamed(self, cache: KVCache, rows: list[slice]) -> dict[tuple[int, int], tuple]:
        """(layer, micro-batch) -> (keys file, values file, first row) for the layers of
        ``cache`` held in files made here: those are streamed by direct I/O."""
        out = {}
        for files in self.files:
            for i, (kf, vf) in files.items():
                k, v = cache.keys.get(i), cache.values.get(i)
                if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor):
                    continue
                row0 = kf.rows_of(k)
                if row0 is None or vf.rows_of(v) != row0 or k.shape[0] != cache.batch:
                    continue
                for b, r in enumerate(rows):
                    out[i, b] = (kf, vf, row0 + r.start)
        return out

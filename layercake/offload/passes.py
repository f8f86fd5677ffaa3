"""One forward pass of the offload executor: its state (``Pass``), the KV cache rows it moves
between tiers around each compute (``KVMover``) and the activations it spills to disk
(``Activations``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from layercake.errors import LayercakeError
from layercake.kv_cache import AttentionStep, KVCache, QuantKV
from layercake.offload.cuda import DeviceKV, to_device_rows, to_host_rows
from layercake.offload.kvdisk import KVStream
from layercake.offload.policy import Policy
from layercake.offload.tiers import advise_willneed, file_tensor

Key = tuple[int, int]  # (layer, micro-batch)


@dataclass
class Pass:
    """The state of one forward pass through the schedule."""

    cache: KVCache
    step: AttentionStep
    rows: list[slice]  # micro-batches
    hs: list[torch.Tensor]  # hidden states per micro-batch
    ctxs: list[Any]
    steps: list[AttentionStep]
    on_disk: set[int]  # micro-batches whose activations live in the file ``act``
    act: torch.Tensor | None
    normed: list[torch.Tensor | None]
    logits: list[torch.Tensor | None]
    last_only: bool
    mapped_kv: set[int]  # layers whose cache is a map of a file (compressed cache on disk)
    streamed: dict[Key, tuple]  # (layer, micro-batch) -> direct I/O of its cache
    cpu_steps: list[AttentionStep]  # CUDA: the steps with their masks in host memory
    copied: dict[int, Any] = field(default_factory=dict)  # unit -> CUDA event after its copies
    argmax: Any = None  # a tied head's ``ArgmaxRows`` (a pass of last positions), else None


class KVMover:
    """A layer's cache rows of a micro-batch, where its attention needs them: the rows of layers
    on disk read ahead by direct I/O into a ring and written back behind; on CUDA those of
    layers in host RAM copied to a device ring ahead (unless ``cpu_cache_compute``: attention
    runs where the cache is); the files of a compressed cache on disk paged in ahead."""

    def __init__(self, device: torch.device, cpu_cache_compute: bool, times: dict) -> None:
        self.device, self.cpu_cache_compute, self.times = device, cpu_cache_compute, times
        self.cuda = device.type == "cuda"
        self.stream = KVStream(pin=self.cuda)
        if self.cuda:
            self.dev = DeviceKV(device, torch.cuda.Stream(device))

    def host_kv(self, s: Pass, layer: int) -> bool:
        """CUDA: the layer's cache is a host tensor (pinned RAM) rather than on the GPU."""
        t = s.cache.keys[layer]
        return self.cuda and isinstance(t, torch.Tensor) and t.device.type == "cpu"

    def load(self, s: Pass, key: Key, r: slice) -> None:
        """Start bringing the cache rows of ``key`` (layer, micro-batch ``r``) in."""
        layer, cache = key[0], s.cache
        if key in s.streamed:  # read ahead into the ring
            kf, vf, row0 = s.streamed[key]
            self.stream.fetch(key, kf, vf, row0, r.stop - r.start, s.step.start)
        elif self.host_kv(s, layer):
            if not self.cpu_cache_compute:  # copied to the device ring ahead
                self.dev.fetch(key, cache.keys[layer][r], cache.values[layer][r])
        elif layer in s.mapped_kv:
            for kv in (cache.keys[layer][r], cache.values[layer][r]):
                for t in kv.parts() if isinstance(kv, QuantKV) else (kv,):
                    advise_willneed(t)

    def store(self, s: Pass, key: Key) -> None:
        """Write the step's new slots of ``key`` back to their tier."""
        if key in s.streamed:  # written back behind
            self.stream.store(key, s.step.start, s.step.end)
        elif self.host_kv(s, key[0]) and not self.cpu_cache_compute:
            self.dev.store(key)

    def get(self, s: Pass, key: Key, r: slice) -> tuple[Any, Any, tuple | None]:
        """(keys, values, the host ring rows to copy back after the compute, or None)."""
        layer, host = key[0], None
        if key in s.streamed:
            t0 = time.perf_counter()
            kc, vc = self.stream.get(key)
            self.times["kv_wait_s"] += time.perf_counter() - t0
            if self.cuda and not self.cpu_cache_compute:
                host = kc, vc
                kc, vc = (to_device_rows(t, self.device) for t in host)
        elif self.host_kv(s, layer) and not self.cpu_cache_compute:
            kc, vc = self.dev.get(key)
        else:
            kc, vc = s.cache.keys[layer][r], s.cache.values[layer][r]
        return kc, vc, host

    @staticmethod
    def put_back(kc: torch.Tensor, vc: torch.Tensor, host: tuple) -> None:
        """The rows computed on the device back into the host ring, before it goes to disk."""
        for dev, ring in zip((kc, vc), host):
            to_host_rows(dev, ring)

    def finish(self) -> None:
        """The pass's new slots are on disk before anyone reads them, and those of host RAM
        layers back in host memory."""
        self.stream.drain()
        self.stream.abandon()
        if self.cuda:
            self.dev.finish()


class Activations:
    """Micro-batches whose hidden states the policy puts on disk, in a file per shape."""

    def __init__(self, offload_dir: Path | None, dtype: torch.dtype) -> None:
        self.offload_dir, self.dtype = offload_dir, dtype
        self.files: dict[tuple[int, ...], torch.Tensor] = {}

    def on_disk(self, policy: Policy, num_batches: int) -> set[int]:
        """The micro-batches (of ``num_batches``) whose activations ``policy`` puts on disk."""
        keep = round(num_batches * (policy.act_device + policy.act_cpu) / 100)
        if keep < num_batches and self.offload_dir is None:
            raise LayercakeError("the policy puts activations on disk: give an offload dir")
        return set(range(keep, num_batches))

    def buffer(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The file-backed tensor of a pass's hidden states (B, T, hidden)."""
        if shape not in self.files:
            self.files.clear()
            d = self.offload_dir / "act"
            self.files[shape] = file_tensor(d / f"{len(self.files)}", shape, self.dtype)
        return self.files[shape]

"""The KV cache as plain data owned by the caller.

All rows of a batch share one write position (``length``): prompts of different lengths are
left-padded, and ``valid`` marks which slots hold real tokens. Model slices read and write
``keys[i]`` / ``values[i]`` for their own global layer indices ``i`` and never change ``length``;
the runner advances it once per step after every slice has run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from layercake.quant import QTensor, QuantSpec, dequantize, quantize


@dataclass
class QuantKV:
    """Keys or values of one layer, (B, n_kv, capacity, head_dim), held quantized in groups
    along head_dim. ``write`` quantizes a step's slots; ``read`` dequantizes slots [0, end) into
    ``work``, a buffer shared by every layer of the cache (layers attend one at a time)."""

    data: torch.Tensor  # (B, n_kv, capacity, head_dim * bits / 8) uint8
    scale: torch.Tensor  # (B, n_kv, capacity, groups) fp16
    zero: torch.Tensor  # (B, n_kv, capacity, groups) fp16
    spec: QuantSpec
    work: torch.Tensor  # (B, n_kv, capacity, head_dim), compute dtype

    @classmethod
    def allocate(
        cls,
        shape: tuple[int, int, int, int],
        spec: QuantSpec,
        work: torch.Tensor,
        new: Callable[[str, tuple[int, ...], torch.dtype], torch.Tensor],
    ) -> QuantKV:
        """``new(part, shape, dtype)`` makes each stored part (zeros in RAM, or a file)."""
        *lead, hd = shape
        groups = hd // spec.group_size
        return cls(
            new("data", (*lead, hd * spec.bits // 8), torch.uint8),
            new("scale", (*lead, groups), torch.float16),
            new("zero", (*lead, groups), torch.float16),
            spec,
            work,
        )

    @staticmethod
    def nbytes_per_value(spec: QuantSpec, head_dim: int) -> float:
        return spec.row_bytes(head_dim) / head_dim

    def parts(self) -> tuple[torch.Tensor, ...]:
        return self.data, self.scale, self.zero

    def __getitem__(self, rows: slice) -> QuantKV:  # a micro-batch's rows: views
        return QuantKV(*(t[rows] for t in self.parts()), self.spec, self.work[rows])

    def index_select(self, dim: int, rows: torch.Tensor) -> QuantKV:
        assert dim == 0
        data, scale, zero = (t.index_select(0, rows) for t in self.parts())
        return QuantKV(data, scale, zero, self.spec, self.work[: rows.numel()])

    def write(self, start: int, end: int, x: torch.Tensor) -> None:
        """Quantize ``x`` (B, n_kv, T, head_dim) into slots [start, end)."""
        q = quantize(x, self.spec.bits, self.spec.group_size)
        self.data[:, :, start:end] = q.data
        self.scale[:, :, start:end] = q.scale
        self.zero[:, :, start:end] = q.zero

    def read(self, end: int) -> torch.Tensor:
        """Slots [0, end) dequantized (a view of ``work``)."""
        q = QTensor(
            self.data[:, :, :end], self.scale[:, :, :end], self.zero[:, :, :end], self.spec,
            (*self.work.shape[:2], end, self.work.shape[3]),
        )  # fmt: skip
        return dequantize(q, self.work[:, :, :end])


@dataclass
class KVCache:
    keys: dict[int, torch.Tensor | QuantKV]  # layer -> (B, n_kv, capacity, head_dim)
    values: dict[int, torch.Tensor | QuantKV]  # layer -> (B, n_kv, capacity, head_dim)
    valid: torch.Tensor  # (B, capacity) bool: slot holds a real (non-padding) token
    length: int = 0  # slots written so far, same for every row
    window: int | None = field(default=None)  # sliding-window attention span, if any

    @classmethod
    def allocate(
        cls,
        layers: list[int] | tuple[int, ...],
        batch: int,
        capacity: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        window: int | None = None,
        quant: QuantSpec | None = None,
    ) -> KVCache:
        """Preallocate the cache: no allocation happens per step afterwards. With ``quant``,
        keys and values are held quantized (``QuantKV``)."""
        shape = (batch, num_kv_heads, capacity, head_dim)
        if quant is not None:
            keys, values = quantized_layers(layers, shape, quant, dtype, device)
        else:
            keys = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
            values = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layers}
        valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        return cls(keys, values, valid, 0, window)

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    def begin(self, token_mask: torch.Tensor) -> AttentionStep:
        """Mark the next T slots (``token_mask`` (B, T), False = padding) and return the step's
        attention description; call ``advance`` after every slice has run."""
        T = token_mask.shape[1]
        start, end = self.length, self.length + T
        if end > self.capacity:
            raise ValueError(f"KV cache full: {end} tokens > capacity {self.capacity}")
        self.valid[:, start:end] = token_mask
        return AttentionStep(start, end, attention_mask(self.valid[:, :end], start, self.window))

    def advance(self, step: AttentionStep) -> None:
        self.length = step.end

    def tensors(self) -> list[torch.Tensor]:
        return [*self.keys.values(), *self.values.values()]

    def shift(self, offset: int) -> None:
        """Move every row's slots [0, length) by ``offset`` (left when negative), in place, and
        move ``length`` with them; slots left behind become padding. Continuous batching uses
        it to make room for a longer prompt (right) or to reclaim slots that no live row needs
        any more (left). Copies run in chunks no longer than the shift, so a source never
        overlaps its destination and nothing is allocated (the cache may be file-backed)."""
        n, d = self.length, offset
        if d == 0:
            return
        if n + d < 0 or n + d > self.capacity:
            raise ValueError(f"cannot shift {n} slots by {d} in a capacity of {self.capacity}")
        if d < 0:  # front first: a chunk's destination was an earlier chunk's source
            spans = [(lo, min(lo - d, n)) for lo in range(-d, n, -d)]
        else:  # back first
            spans = [(max(0, hi - d), hi) for hi in range(n, 0, -d)]
        for lo, hi in spans:
            for t in self.tensors():
                t[:, :, lo + d : hi + d].copy_(t[:, :, lo:hi])
            self.valid[:, lo + d : hi + d].copy_(self.valid[:, lo:hi])
        if d < 0:
            self.valid[:, n + d : n] = False
        else:
            self.valid[:, :d] = False
        self.length = n + d

    def rows(self, a: int, b: int, length: int) -> KVCache:
        """A view of rows [a, b) whose next write goes to slot ``length``: a forward through it
        fills those rows of this cache in place (this cache's ``length`` does not move)."""
        keys = {i: t[a:b] for i, t in self.keys.items()}
        values = {i: t[a:b] for i, t in self.values.items()}
        return KVCache(keys, values, self.valid[a:b], length, self.window)

    def like(self, batch: int, capacity: int) -> KVCache:
        """An empty cache for the same layers, shape, dtype and device (in memory)."""
        k = next(iter(self.keys.values()))
        _, n_kv, _, hd = k.shape
        return KVCache.allocate(list(self.keys), batch, capacity, n_kv, hd, k.dtype,
                                self.valid.device, self.window)  # fmt: skip

    def load_rows(self, rows: torch.Tensor, src: KVCache, at: int) -> None:
        """Copy every row of ``src`` (slots [0, src.length)) into ``rows`` of this cache at slots
        [at, at + src.length); the rest of those rows becomes padding."""
        n = src.length
        for dst_t, src_t in zip(self.tensors(), src.tensors()):  # layers may be on other devices
            dst_t.narrow(2, at, n).index_copy_(
                0, rows.to(dst_t.device), src_t[:, :, :n].to(dst_t.device)
            )
        self.valid.index_fill_(0, rows, False)
        self.valid.narrow(1, at, n).index_copy_(0, rows, src.valid[:, :n])

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` of the batch (drop finished sequences)."""
        for d in (self.keys, self.values):
            for i in d:
                t = d[i]
                d[i] = t.index_select(0, rows.to(t.device) if isinstance(t, torch.Tensor) else rows)
        self.valid = self.valid.index_select(0, rows)


def quantized_layers(
    layers: list[int] | tuple[int, ...],
    shape: tuple[int, int, int, int],
    spec: QuantSpec,
    dtype: torch.dtype,
    device: torch.device | str,
    new: Callable[[int, str, tuple[int, ...], torch.dtype], torch.Tensor] | None = None,
) -> tuple[dict[int, QuantKV], dict[int, QuantKV]]:
    """Quantized keys and values per layer; ``new(layer, part, shape, dtype)`` places each
    stored part (default zeros on ``device``). Two work buffers serve every layer."""

    def zeros(layer: int, part: str, s: tuple[int, ...], dt: torch.dtype) -> torch.Tensor:
        return torch.zeros(s, dtype=dt, device=device)

    new = new or zeros
    work_k = torch.empty(shape, dtype=dtype, device=device)
    work_v = torch.empty(shape, dtype=dtype, device=device)
    keys = {
        i: QuantKV.allocate(shape, spec, work_k, lambda p, s, d, i=i: new(i, "k" + p, s, d))
        for i in layers
    }
    values = {
        i: QuantKV.allocate(shape, spec, work_v, lambda p, s, d, i=i: new(i, "v" + p, s, d))
        for i in layers
    }
    return keys, values


@dataclass(frozen=True)
class AttentionStep:
    """Where this step's T tokens go in the cache, and which keys each query may see."""

    start: int
    end: int
    mask: torch.Tensor  # (B, 1, T, end) bool, True = may attend
    # a compiled one-token step (static shapes): the slot written, as a (1,) tensor; the mask
    # then covers the whole capacity and start/end are unused
    slot: torch.Tensor | None = None


def attention_mask(valid: torch.Tensor, start: int, window: int | None = None) -> torch.Tensor:
    """Causal mask over cache slots [0, end) for queries in slots [start, end).

    A query always sees itself, even when it is padding: a row with no visible key would give NaN,
    and NaN values of a padding slot would then leak into real rows through 0 * NaN.
    """
    end = valid.shape[1]
    q = torch.arange(start, end, device=valid.device)[:, None]  # (T, 1)
    k = torch.arange(end, device=valid.device)[None, :]  # (1, end)
    causal = k <= q
    if window is not None:
        causal = causal & (q - k < window)
    mask = causal[None] & valid[:, None, :]  # (B, T, end)
    mask = mask | (k == q)[None]
    return mask[:, None]  # (B, 1, T, end)

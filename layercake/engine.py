"""Continuous batching over a Runner: a fixed number of slots (cache rows); when a sequence
finishes, a waiting one is prefilled into its slot, so the batch stays full. Used by the batch
job and the server.

Every row of a ``KVCache`` writes at the same slot (``length``), so a new prompt of P tokens is
placed at slots [length - P, length) of its row, its earlier slots marked padding: positions are
the row's own (0 at its first token), and prompts are prefilled unpadded (``prefill.prefill``),
so what the row computes equals a solo run. The cache is
shifted right when a prompt is longer than ``length``, and left when ``length`` reaches the
capacity (by the first slot any live row still uses; the capacity leaves slack so this happens
rarely). Each admission group gets its own ``Sampler`` (seeds, penalties, logprobs per row).

The cache's capacity follows the sequences in flight, not the longest one the engine may take:
it starts at ``initial`` slots, grows (a new cache, the written slots copied) when a longer
sequence is admitted, and is allocated afresh at its starting size when a request arrives to an
empty engine after a long one. A runner with a memory plan for its cache (offloading) gets the
whole capacity at once instead; one whose steps are compiled (a graph per cache size) gets two
sizes only, the starting one and the whole capacity.

A step runs only the live rows (on a ``LocalRunner`` whose cache is in this process): they are
kept as a prefix of the slots (when a sequence finishes, the last live row moves into its slot:
its cache row, token, position and sampler place), and the step forwards a view of the first
rows. Eagerly that is exactly the live rows; a compiled step (a graph per row count) runs the
smallest of a few bucket sizes (1, 2, 4, ... and ``slots``) that holds them, the rest masked.
A lone stream so costs one row, not every slot; each row computes what it computes alone.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from layercake.errors import LayercakeError
from layercake.generate import GenerationStats, Row, StepEvent, check_prompt
from layercake.kv_cache import KVCache, QuantKV
from layercake.prefill import prefill
from layercake.runner import LocalRunner
from layercake.sampling import Sampler, SampleStep, SamplingParams, greedy_tokens

if TYPE_CHECKING:
    from layercake.runner import Runner


@dataclass(eq=False)
class Request:
    """One sequence to complete; ``tag`` is the caller's own handle."""

    prompt: list[int]
    params: SamplingParams
    tag: Any = None
    cancelled: bool = False  # set by the caller (any thread): the slot is freed at next step
    finished: bool = field(default=False, init=False)
    error: Exception | None = field(default=None, init=False)  # why it failed alone (finished)


@dataclass(eq=False)
class _Group:
    """Sequences admitted together: one Sampler, rows in ``slots`` order."""

    sampler: Sampler
    slots: list[int]
    index: torch.Tensor | None = None  # slots as a tensor (None = every slot, in order)


@dataclass(eq=False)
class _Seq:
    request: Request
    row: Row
    group: _Group


class Engine:
    """Slots of a fixed batch size over one cache; ``step`` admits waiting requests into free
    slots and runs one decode step for every live sequence."""

    def __init__(
        self,
        runner: Runner,
        eos_token_ids: list[int],
        decode: Callable[[list[int]], str],
        slots: int,
        capacity: int,
        initial: int | None = None,
    ) -> None:
        """``capacity``: the most cache slots per row (prompt + generated tokens of any one
        sequence must fit); ``initial``: the slots allocated at first (default the smaller of
        ``capacity`` and ``INITIAL_CAPACITY``)."""
        if slots < 1:
            raise LayercakeError(f"the batch size must be at least 1, got {slots}")
        self.runner, self.eos, self.decode = runner, set(eos_token_ids), decode
        self.slots, self.capacity = slots, capacity
        self.max_span = min(capacity, runner.max_context)  # prompt + generated, per sequence
        self.resizable = getattr(runner, "block_size", None) is None  # offloading plans its own
        first = capacity if not self.resizable else min(capacity, initial or INITIAL_CAPACITY)
        self.initial = first
        # a compiled step is one graph per cache size: two sizes only (compiled once each)
        self.two_sizes = compiles_steps(runner)
        self.cache = runner.new_cache(slots, first)
        self.resizable = self.resizable and _resizable(self.cache)
        dev = runner.device
        self.seqs: list[_Seq | None] = [None] * slots
        self.groups: list[_Group] = []
        self.waiting: deque[Request] = deque()
        self.tokens = torch.zeros(slots, 1, dtype=torch.long, device=dev)  # next input per slot
        self.pos = torch.zeros(slots, 1, dtype=torch.long, device=dev)  # its position
        self.start = [0] * slots  # first cache slot each live row uses
        self.stats = GenerationStats(batch_size=slots)
        # live rows as a prefix, steps over them only (else every slot, dead rows masked)
        self.compacts = self.resizable and isinstance(runner, LocalRunner)
        self.buckets = batch_buckets(slots) if self.two_sizes else None

    # ---- queue -----------------------------------------------------------------------------
    def check(self, prompt: list[int], params: SamplingParams) -> None:
        """Raise LayercakeError if this request cannot run here (bad params, too long)."""
        limit = (
            "the model's context"
            if self.max_span == self.runner.max_context
            else ("the engine's context (--max-context)")
        )
        check_prompt("the prompt", prompt, params, self.runner.vocab_size, self.max_span, limit)

    def add(self, request: Request) -> None:
        self.check(request.prompt, request.params)
        self.waiting.append(request)

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(s is not None for s in self.seqs)

    # ---- one step --------------------------------------------------------------------------
    def step(self) -> list[tuple[Request, StepEvent]]:
        """Admit what fits, then decode one token for every live sequence."""
        self._drop_cancelled()
        events = self._admit()
        if not any(s is not None for s in self.seqs):
            return events
        t0 = time.perf_counter()
        with torch.inference_mode():
            if self.cache.length >= self.cache.capacity:
                self._compact()
            B = self.step_rows()
            live = [s is not None for s in self.seqs[:B]]
            mask = None if all(live) else torch.tensor(live, device=self.tokens.device)[:, None]
            cache = self.cache if B == self.slots else self.cache.rows(0, B, self.cache.length)
            tokens, pos = self.tokens[:B], self.pos[:B]
            logits = self.runner.forward(tokens, pos, cache, mask, last_only=True)
            self.cache.length = cache.length  # a view of the first rows moved its own
            pos += 1 if mask is None else mask
            out = self._sample(logits[:, -1], lambda b: True)
        self.stats.decode_s += time.perf_counter() - t0
        self.stats.decode_steps += 1
        self.stats.decode_tokens += len(out)
        self.stats.generated_tokens += len(out)
        return events + out

    def step_rows(self) -> int:
        """Rows the next step forwards: every slot, or (compacting) the live prefix, rounded up
        to a bucket where steps are compiled."""
        if not self.compacts:
            return self.slots
        n = sum(s is not None for s in self.seqs)
        return n if self.buckets is None else next(b for b in self.buckets if b >= n)

    def _drop_cancelled(self) -> None:
        if any(r.cancelled for r in self.waiting):
            self.waiting = deque(r for r in self.waiting if not r.cancelled)
        done = [b for b, s in enumerate(self.seqs) if s is not None and s.request.cancelled]
        if done:
            self._free(done)

    def _admit(self) -> list[tuple[Request, StepEvent]]:
        free = [b for b, s in enumerate(self.seqs) if s is None]
        if not free or not self.waiting:
            return []
        t0 = time.perf_counter()
        reqs = [self.waiting.popleft() for _ in range(min(len(free), len(self.waiting)))]
        slots = free[: len(reqs)]
        P = max(len(r.prompt) for r in reqs)
        with torch.inference_mode():
            self._fit(reqs)
            if all(s is None for s in self.seqs):
                self.cache.length, self.cache.valid[:] = 0, False
            if self.cache.length < P:  # room in front for the longest new prompt
                self._shift(P - self.cache.length)
            logits = prefill(self.runner, self.cache, [r.prompt for r in reqs], slots)
            dev = self.runner.device
            sampler = Sampler(
                [r.params for r in reqs], self.runner.vocab_size, [r.prompt for r in reqs], dev
            )
            group = _Group(sampler, slots)
            self._index(group)
            self.groups.append(group)
            for b, r in zip(slots, reqs):
                self.seqs[b] = _Seq(r, Row(0, r.params, self.eos, self.decode), group)
                self.pos[b, 0] = len(r.prompt)
                self.start[b] = self.cache.length - len(r.prompt)
            new = set(slots)
            events = self._sample(logits, lambda b: b in new, group)
        self.stats.prefill_s += time.perf_counter() - t0
        self.stats.prompt_tokens += sum(len(r.prompt) for r in reqs)
        self.stats.generated_tokens += len(events)
        return events

    def _sample(
        self, logits: torch.Tensor, take: Callable[[int], bool], only: _Group | None = None
    ) -> list[tuple[Request, StepEvent]]:
        """Sample every group's rows (or only ``only``, whose rows are all of ``logits``);
        record each token, free the slots of finished sequences."""
        events, finished = [], []
        groups = [only] if only is not None else self.groups
        together = greedy_together(logits, groups)
        for g in groups:
            try:
                if g in together:
                    step = together[g]
                else:
                    x = logits if only is not None or g.index is None else logits[g.index]
                    step = g.sampler.sample(x)
            except Exception as e:  # this group's requests fail alone: the other rows go on
                for b in g.slots:
                    self.seqs[b].request.error, self.seqs[b].request.finished = e, True
                finished += g.slots
                continue
            self.tokens[slice(None) if g.index is None else g.index, 0] = step.tokens
            for b, t, lp in zip(g.slots, step.token_ids, step.logprobs):
                if not take(b):
                    continue
                seq = self.seqs[b]
                ev = seq.row.push(t, lp)
                events.append((seq.request, ev))
                if ev.finish_reason is not None:
                    seq.request.finished = True
                    finished.append(b)
        if finished:
            self._free(finished)
        return events

    def _free(self, slots: list[int]) -> None:
        gone = set(slots)
        for g in {id(self.seqs[b].group): self.seqs[b].group for b in slots}.values():
            keep = [j for j, b in enumerate(g.slots) if b not in gone]
            if not keep:
                self.groups.remove(g)
                continue
            g.sampler.select(keep)
            g.slots = [g.slots[j] for j in keep]
            self._index(g)
        for b in slots:
            self.seqs[b] = None
        if self.compacts:
            self._pack()

    def _pack(self) -> None:
        """Move the last live rows into the free slots below them: live rows become a prefix."""
        free = [b for b, s in enumerate(self.seqs) if s is None]
        while free and any(s is not None for s in self.seqs[free[0] + 1 :]):
            dst = free.pop(0)
            src = max(b for b, s in enumerate(self.seqs) if s is not None)
            move_row(self.cache, src, dst)
            for t in (self.tokens, self.pos):
                t[dst] = t[src]
            self.start[dst] = self.start[src]
            seq = self.seqs[dst] = self.seqs[src]
            self.seqs[src] = None
            g = seq.group
            g.slots[g.slots.index(src)] = dst  # its sampler row stays where it was
            self._index(g)
            free.append(src)
            free.sort()

    def _index(self, g: _Group) -> None:
        every = g.slots == list(range(self.slots))
        g.index = None if every else torch.tensor(g.slots, device=self.tokens.device)

    def _fit(self, new: list[Request]) -> None:
        """Size the cache for the live sequences and ``new``: grow it (copying what is written)
        when one of them would leave too little slack; when the engine is empty, start afresh
        if the cache is too small or more than twice what ``new`` needs."""
        if not self.resizable:
            return
        live = [s.request for s in self.seqs if s is not None]
        need = max(len(r.prompt) + r.params.max_new_tokens for r in [*live, *new])
        cap = self.cache.capacity
        short = need > cap * 2 // 3  # slack: a compaction every cap / 3 steps at worst
        if not live:
            want = min(self.capacity, max(self.initial, default_capacity(need)))
            if self.two_sizes and want > self.initial:
                want = self.capacity
            if want != cap and (short or cap > 2 * want):
                self.cache = None  # its memory goes back before the new one is taken
                self.cache = self.runner.new_cache(self.slots, want)
        elif short:
            size = min(self.capacity, max(default_capacity(need), 2 * cap))
            size = self.capacity if self.two_sizes else size
            if size > cap:
                self.cache = grown(self.runner.new_cache(self.slots, size), self.cache)

    def _compact(self) -> None:
        """Drop the cache slots in front of every live row's first slot."""
        first = min(self.start[b] for b, s in enumerate(self.seqs) if s is not None)
        if first == 0:  # cannot happen: check() keeps every span within the capacity
            raise LayercakeError("KV cache full")
        self._shift(-first)

    def _shift(self, offset: int) -> None:
        self.cache.shift(offset)
        self.start = [max(0, s + offset) for s in self.start]

    def run(self) -> list[tuple[Request, StepEvent]]:
        """Step until nothing is waiting or running; every event, in order."""
        events = []
        while self.busy:
            events += self.step()
        return events


INITIAL_CAPACITY = 256  # cache slots per row an engine starts with, unless told


def batch_buckets(slots: int) -> list[int]:
    """Row counts a compiled step runs (one graph each): powers of two below ``slots``, and
    ``slots``."""
    return [b for b in (1 << i for i in range(slots.bit_length())) if b < slots] + [slots]


def greedy_together(logits: torch.Tensor, groups: list[_Group]) -> dict[_Group, SampleStep]:
    """The steps of the groups whose samplers are plain greedy, from one argmax over every row
    of ``logits`` (the step's rows, in slot order) instead of an index and an argmax per group:
    streams that arrived apart are groups of their own. The same tokens as their own samplers."""
    plain = [g for g in groups if g.sampler.plain_greedy]
    if len(plain) < 2:
        return {}
    ids = greedy_tokens(logits)
    return {g: g.sampler.record(ids if g.index is None else ids[g.index]) for g in plain}


def move_row(cache: KVCache, src: int, dst: int) -> None:
    """Copy row ``src`` of ``cache`` (its written slots and their padding marks) into ``dst``."""
    n = cache.length
    for t in cache.tensors():
        for x in t.parts() if isinstance(t, QuantKV) else (t,):
            x[dst, :, :n].copy_(x[src, :, :n])
    cache.valid[dst].copy_(cache.valid[src])


def compiles_steps(runner: object) -> bool:
    """Whether ``runner`` runs its one-token steps as a compiled graph (``LocalRunner`` with
    ``compile_step``): each cache size it sees is compiled once, tens of seconds."""
    return getattr(runner, "_step", None) is not None


def _resizable(cache: object) -> bool:
    """A cache ``grown`` can copy: held in tensors (plain or quantized) in this process."""
    return isinstance(cache, KVCache) and all(
        isinstance(t, (torch.Tensor, QuantKV)) for t in cache.tensors()
    )


def grown(new: KVCache, old: KVCache) -> KVCache:
    """``new`` (a larger, empty cache for the same rows and layers) with ``old``'s written slots
    [0, length) copied in, layer by layer (``old`` is emptied: each layer goes once copied)."""
    n = old.length
    for d in (old.keys, old.values):
        dst = new.keys if d is old.keys else new.values
        for i in list(d):
            a, b = dst[i], d.pop(i)
            for x, y in zip(*(t.parts() if isinstance(t, QuantKV) else (t,) for t in (a, b))):
                x[:, :, :n].copy_(y[:, :, :n])
    new.valid[:, :n].copy_(old.valid[:, :n])
    new.length = n
    return new


def default_capacity(spans: int) -> int:
    """Cache slots for sequences of up to ``spans`` tokens: half as much again, so the cache is
    compacted at most once every ``spans / 2`` steps."""
    return spans + max(8, spans // 2)

"""Routed experts as offload units: read after the router chose them, only the chosen ones.

``store.plan_units`` makes each routed expert of a layer (``layers.N.mlp.experts.E.*``) a unit of
its own (kind ``expert``), placed whole: the policy's RAM share of each layer's experts is held
in RAM, the rest lives in the offload layout, one file per expert. The zig-zag schedule runs
the other units (attention, router, norms, shared expert: they always run); a MoE layer's
``run_experts`` is replaced here, so that when the layer's router has chosen experts for the rows
of the pass (at decode, the whole block is one pass: ``OffloadRunner.micro_rows``):

1. the chosen experts not held in RAM are handed to a loader of their own (each read once, as
   one large direct read, in file order) unless they were queued already: as a layer starts,
   the next MoE layer's cold experts that the pass's rows choose with a chance of at least
   ``READ_AHEAD_P`` are queued before its router runs (at large blocks every cold expert, so
   the disk never waits for a router);
2. ``models.moe.grouped`` runs each chosen expert once on all its rows: a read one as soon as
   its read is done, a held one while the next read goes on (``order``); the index it looks up
   binds the expert's weights first (from RAM, or from its staging buffer once read, handed
   back after its compute); one read ahead but not chosen is handed back in queue order;
3. experts nobody chose are neither read nor run.

Routing counts are kept per layer; every ``REBALANCE_EVERY`` passes the hottest experts on disk
are marked to replace colder ones held in RAM (``rebalance``), and each move happens when the
marked expert is next read anyway (``promote``): the RAM share serves the most selections and
no byte is read to move it.

Decode steps hold more experts than a prompt's pass (``decode_extra`` in all, spread over the
layers; ``footprint.decode_room``: the room the plan gives a prompt's activations that a
one-token step leaves free, and the page-cache headroom a prompt's pass needs and a step does
not): at each one-token pass the hottest experts on disk are marked to be kept, without
replacing any, when next read anyway; before a pass of several tokens per row those extras (the
least selected held experts) go back to disk, so that the prompt finds its room again. (Tried
in moe6 and dropped: the runs thrashed at decode; the cause was the moved-out experts' pages
that stayed resident, ``tiers.let_go``.)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch

from layercake.models.moe import RowsBuffer, grouped
from layercake.offload.policy import split_bytes
from layercake.offload.routing import probs_from_counts
from layercake.offload.store import Unit, disk_range
from layercake.offload.tiers import align_up, host_buffer, let_go, trim_heap

REBALANCE_EVERY = 4  # passes between moves of hot experts into RAM
# a cold expert of the next layer is read before its router ran when the pass's rows choose it
# with at least this chance (at large blocks every expert: the reads never wait for a router)
READ_AHEAD_P = 0.9


def resident_bytes(
    units: list[Unit], w_device: float, w_cpu: float
) -> dict[int, tuple[int, int]] | None:
    """(device, cpu) bytes of each unit when routed experts are units (None otherwise): the
    policy's share of all weights, spent first on the units that always run (attention,
    router, shared expert, head), then on whole experts, the same number in every layer (in
    index order until routing counts say which are hot) and one more in as many layers as the
    rest holds whole experts (a B=64 OLMoE plan left 7-57 MB, up to 4 experts, unused). Where
    even the always-run units do not fit, each unit keeps the policy's share (experts whole or
    not at all, by the same count)."""
    experts = [j for j, u in enumerate(units) if u.kind == "expert"]
    if not experts:
        return None
    W = sum(u.nbytes for u in units)
    dev, cpu, _ = split_bytes(W, w_device, w_cpu)
    ram = dev + cpu
    always = W - sum(units[j].nbytes for j in experts)
    dev_frac = dev / ram if ram else 0.0
    per_layer: dict[int, list[int]] = {}
    for j in experts:
        per_layer.setdefault(units[j].index, []).append(j)
    E = max(len(v) for v in per_layer.values())
    extra = 0  # layers (the first ones) holding one expert more
    if always <= ram:
        left = ram - always
        index_bytes = max(1, sum(units[j].nbytes for j in experts) // E)  # one per layer
        n = min(E, int(left // index_bytes))
        if n < E:
            extra = int((left - n * index_bytes) // max(units[j].nbytes for j in experts))
    else:
        n = int(E * ram / W) if W else 0
    layers = sorted(per_layer)
    out = {}
    for j, u in enumerate(units):
        if u.kind == "expert":
            held = per_layer[u.index].index(j) < n + (layers.index(u.index) < extra)
            share = 1.0 if held else 0.0
        else:
            share = 1.0 if always <= ram else ram / W
        b = int(u.nbytes * share)
        out[j] = (int(b * dev_frac), b - int(b * dev_frac))
    return out


def decode_extra(units: list[Unit], room: int) -> int:
    """Experts that ``room`` bytes hold besides the plan's (each the size of the largest, in a
    page-aligned buffer of its own)."""
    largest = max((align_up(u.nbytes) for u in units if u.kind == "expert"), default=0)
    return int(room // largest) if largest else 0


class ExpertUnits:
    """The routed experts of an ``OffloadRunner``'s MoE layers."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.loader = runner.expert_loader
        self.unit: dict[tuple[int, int], int] = {}
        for j, u in enumerate(runner.units):
            if u.kind == "expert":
                self.unit[u.index, int(u.name.rpartition(".")[2])] = j
        self.layers = sorted({i for i, _ in self.unit})
        self.counts: dict[int, torch.Tensor] = {}
        self.reads = 0  # experts read from disk, all passes
        self.routed = 0  # distinct experts chosen per layer and pass, summed
        self.passes = 0
        self.read_bytes = 0
        self.read_ahead = 0  # experts read before their router ran
        self.wasted = 0  # of those, not chosen by the router
        self.swaps: dict[int, dict[int, int]] = {}  # layer -> {unit to RAM: unit to disk}
        self.unrun: set[int] = set()  # held units of the running layer call not run yet
        self.moved = 0  # experts moved into RAM
        self.ahead: dict[int, list[int]] = {}  # layer -> experts read before its router ran
        self.last_rows = [0, 0]  # rows of the latest two passes
        self.top_k = 1
        self.decode_extra = 0  # experts held beyond the plan's at one-token passes, in all
        self.grow: dict[int, set[int]] = {}  # layer -> units to keep in RAM when next read
        self.grown: dict[int, int] = {}  # layer -> experts held beyond the plan's now
        self.rows = RowsBuffer()  # ``grouped``'s choice rows, shared by every layer
        for i in self.layers:
            moe = runner.model.layers()[str(i)].mlp
            self.counts[i] = torch.zeros(len(moe.experts), dtype=torch.long)
            self.top_k = moe.top_k
            moe.run_experts = partial(self.run, i, moe)

    def on_disk(self, j: int) -> bool:
        return self.loader is not None and j in self.loader.ranges

    def run(self, layer: int, moe: Any, x: torch.Tensor, ids: torch.Tensor,
            weights: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """``SparseMoE.run_experts`` for an offloaded layer (see the module doc)."""
        chosen = torch.unique(ids).tolist()
        self.counts[layer] += torch.bincount(ids.flatten(), minlength=len(moe.experts))
        cold = {e for e in chosen if self.on_disk(self.unit[layer, e])}
        ahead = self.ahead.pop(layer, [])  # read before the router ran, in this order
        fifo = ahead + sorted(cold - set(ahead))  # the loader's order of this layer's reads
        for e in fifo[len(ahead) :]:
            self.loader.submit(self.unit[layer, e])
        self._read_ahead(layer, x.shape[0])
        self.routed += len(chosen)
        self.reads += len(fifo)
        self.read_bytes += sum(self.loader.ranges[self.unit[layer, e]][1] for e in fifo)
        self.wasted += len(set(ahead) - cold)
        self.read_ahead += len(ahead)
        view = _Bound(self, layer, moe, cold, fifo)
        held = [e for e in chosen if e not in cold]  # computed while the reads go on
        order = self.order(layer, held, [e for e in fifo if e in cold])
        try:
            return grouped(x, ids, weights, view, order, self.rows)
        finally:
            self.unrun = set()
            view.drain()
            if layer == self.layers[-1]:
                self.passes += 1
                if self.passes % REBALANCE_EVERY == 0:
                    self.rebalance()

    def order(self, layer: int, held: list[int], reads: list[int]) -> Iterator[int]:
        """The order a layer's chosen experts run in, decided as they go: a read one as soon as
        its read is done (its staging slot is handed back after its compute, so the loader
        reads on), a held one while the next read is still in progress, the remaining reads in
        the loader's order once no held one is left. Held experts first (the earlier order)
        left the ring full and the disk idle while they computed: 8 rows an expert at decode,
        a prompt's 100+ rows. Each expert's output is its own rows', so the order changes no
        value."""
        h = r = 0
        self.unrun = {self.unit[layer, e] for e in held}  # not to be moved to disk yet
        while h < len(held) or r < len(reads):
            if r < len(reads) and (h == len(held) or self.loader.ready(self.unit[layer, reads[r]])):
                r += 1
                yield reads[r - 1]
            else:
                h += 1
                self.unrun.discard(self.unit[layer, held[h - 1]])
                yield held[h - 1]

    def begin_pass(self, tokens: int, rows: int) -> None:
        """Before a pass of ``tokens`` tokens per row, ``rows`` tokens in all: a prompt's pass
        (more than one per row) first sends the decode steps' extra experts back to disk; a
        one-token pass marks the hottest experts on disk to be kept when next read, up to
        ``allowance`` per layer. Then the first layer's likely cold experts are queued (unless
        the previous pass queued them), so that they are read while the embedding and the
        first attention compute, as every later layer's are read while the layer before
        computes."""
        if tokens > 1:
            self._give_back_extras()
        else:
            for i in self.layers:
                want = self.allowance(i) - self.grown.get(i, 0)
                c = self.counts[i].tolist()
                cold = sorted((e for e in range(len(c)) if self.on_disk(self.unit[i, e])),
                              key=lambda e: -c[e])  # fmt: skip
                self.grow[i] = {self.unit[i, e] for e in cold[: max(0, want)]}
        if self.layers[0] not in self.ahead:
            self._queue_likely(self.layers[0], rows)

    def allowance(self, layer: int) -> int:
        """Layer ``layer``'s share of ``decode_extra`` (the first layers one more)."""
        n, left = divmod(self.decode_extra, len(self.layers))
        return n + (self.layers.index(layer) < left)

    def _give_back_extras(self) -> None:
        """The decode steps' extra experts (each layer's least selected held ones) to disk."""
        if any(self.grown.values()):
            for i in self.layers:
                c = self.counts[i].tolist()
                held = sorted((e for e in range(len(c)) if not self.on_disk(self.unit[i, e])),
                              key=lambda e: c[e])  # fmt: skip
                for e in held[: self.grown.get(i, 0)]:
                    self.to_disk(self.unit[i, e])
            self.swaps.clear()  # their experts to replace may have gone
            trim_heap()
        self.grow.clear()
        self.grown.clear()

    def _read_ahead(self, layer: int, rows: int) -> None:
        """Queue the reads of the next MoE layer's cold experts that this pass's ``rows`` rows
        will almost surely choose (at large blocks: every cold expert, in file order), so that
        the disk keeps reading while this layer and the next one's attention compute; after the
        last layer, the first layer's for the next pass when this pass had the rows of the two
        before (decode steps: the reads go on through the head and the next embedding; at the
        end of a generation they wait in the ring for the next pass)."""
        at = self.layers.index(layer) + 1
        if at == len(self.layers):  # the next pass's first layer, once passes repeat (decode)
            again = self.last_rows == [rows, rows]
            self.last_rows = [self.last_rows[-1], rows]
            if not again:
                return
            at = 0
        self._queue_likely(self.layers[at], rows)

    def _queue_likely(self, layer: int, rows: int) -> None:
        """Queue the reads of ``layer``'s cold experts that ``rows`` rows choose with a chance
        of at least ``READ_AHEAD_P`` (``ahead``: in the loader's order)."""
        p = probs_from_counts(self.counts[layer].tolist(), self.top_k)
        likely = [e for e, pe in enumerate(p) if 1.0 - (1.0 - pe) ** rows >= READ_AHEAD_P]
        self.ahead[layer] = [e for e in likely if self.on_disk(self.unit[layer, e])]
        for e in self.ahead[layer]:
            self.loader.submit(self.unit[layer, e])

    def rebalance(self) -> None:
        """Per layer, the most selected experts on disk are to replace the least selected ones
        held in RAM (same bytes: the budget does not change). Nothing is read for it: an expert
        to move in is kept from the next read that brings it in anyway (``promote``)."""
        for i in self.layers:
            c = self.counts[i].tolist()
            held = [e for e in range(len(c)) if not self.on_disk(self.unit[i, e])]
            cold = [e for e in range(len(c)) if self.on_disk(self.unit[i, e])]
            held.sort(key=lambda e: c[e])
            cold.sort(key=lambda e: -c[e])
            self.swaps[i] = {}
            for out, into in zip(held, cold):
                if c[into] <= c[out]:
                    break
                self.swaps[i][self.unit[i, into]] = self.unit[i, out]

    def promote(self, layer: int, into: int, staging: torch.Tensor) -> bool:
        """If unit ``into`` (just read into ``staging``) is to move into RAM (to replace a held
        expert, or as a decode step's extra), copy it there and drop the expert it replaces to
        disk; whether it moved."""
        out = self.swaps.get(layer, {}).get(into)
        extra = out is None and into in self.grow.get(layer, ())
        if not extra and (out is None or out in self.unrun):  # one held still to run: later
            return False
        if out is not None:
            del self.swaps[layer][into]
        r = self.runner
        rng = self.loader.ranges[into]
        mem = host_buffer(rng[1])
        mem.copy_(staging[: rng[1]])
        for p in r.placed[into]:
            e = p.entry
            lo = e.offset - rng[0]
            p.cpu = mem[lo : lo + e.nbytes].view(e.shape[0], -1).view(e.torch_dtype)
            p.b = e.shape[0]
        del self.loader.ranges[into]
        if extra:
            self.grow[layer].discard(into)
            self.grown[layer] = self.grown.get(layer, 0) + 1
        else:
            self.to_disk(out)
            trim_heap()
        self.moved += 1
        return True

    def to_disk(self, out: int) -> None:
        """Unit ``out`` (held in RAM) lives on disk from now on: its RAM goes at once."""
        r = self.runner
        first = {p.entry.param: 0 for p in r.placed[out]}
        self.loader.ranges[out] = r.disk_ranges[out] = disk_range(r.units[out], first)
        for p in r.placed[out]:
            let_go(p.cpu)
            p.cpu, p.b = None, 0
            if p.owner is not None:  # its module's binding would keep the rows until it is
                # next read: a pass's moves at once would sit on top of the budget
                if p.attr in p.owner._parameters:
                    p.owner._parameters[p.attr] = None
                else:
                    setattr(p.owner, p.attr, None)

    def stats(self) -> dict[str, float]:
        """Per pass and MoE layer: experts chosen, experts read from disk; bytes read."""
        n = max(1, self.passes) * max(1, len(self.layers))
        return dict(experts_routed_per_layer=self.routed / n, experts_read_per_layer=self.reads / n,
                    expert_gb_read=self.read_bytes / 1e9, passes=self.passes,
                    experts_read_ahead=self.read_ahead, experts_moved_to_ram=self.moved,
                    decode_extra=self.decode_extra,
                    decode_extra_held=sum(self.grown.values()),
                    experts_read_ahead_unused=self.wasted)  # fmt: skip


class _Bound:
    """What ``grouped`` indexes: expert e with its weights bound (and a read one's staging
    buffer handed back once the next expert is looked up, i.e. after its compute). ``fifo``:
    the layer's reads in the loader's order; those read ahead but not chosen are handed back
    in that order before a later read is waited for (their slots let the later reads go on)."""

    def __init__(self, xu: ExpertUnits, layer: int, moe: Any, cold: set[int],
                 fifo: list[int]) -> None:  # fmt: skip
        self.xu, self.layer, self.moe, self.cold = xu, layer, moe, cold
        self.fifo = list(reversed(fifo))  # popped from the end: the loader's order
        self.held: int | None = None  # unit whose staging buffer the last expert used

    def __len__(self) -> int:
        return len(self.moe.experts)

    def __getitem__(self, e: int) -> torch.nn.Module:
        self.close()
        xu, r = self.xu, self.xu.runner
        j = xu.unit[self.layer, e]
        staging = None
        if e in self.cold:
            t0 = time.perf_counter()
            while (first := self.fifo.pop()) != e:  # read ahead, not chosen: hand it back
                self._hand_back(first)
            staging = xu.loader.wait(j)
            r.times["weights_wait_s"] += time.perf_counter() - t0
            self.held = j
            if xu.promote(self.layer, j, staging):  # now in RAM: bound from there
                self.close()
                staging = None
        r.materialize(j, staging)
        return self.moe.experts[e]

    def _hand_back(self, e: int) -> None:
        j = self.xu.unit[self.layer, e]
        try:
            self.xu.promote(self.layer, j, self.xu.loader.wait(j))  # read anyway: kept if due
        finally:
            self.xu.loader.free(j)

    def drain(self) -> None:
        """Hand back every buffer of this pass, also of reads not consumed (an error midway, or
        read ahead and not chosen)."""
        self.close()
        while self.fifo:
            self._hand_back(self.fifo.pop())

    def close(self) -> None:
        if self.held is not None:
            self.xu.loader.free(self.held)
            self.held = None

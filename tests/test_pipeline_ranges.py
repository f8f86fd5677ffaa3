"""Range streaming: a node holding several non-adjacent ranges under one ``cpu_memory`` streams
them through one shared pool of slots (``pipeline.pool``), keeps what it read until a slot is
needed, gives up the unit needed furthest ahead, and runs the job with the single process's
tokens."""

from __future__ import annotations

import threading

import pytest
import torch
from test_pipeline import PROMPTS, job, llama5, reference, topology, workers  # noqa: F401

import layercake.offload.footprint as off
from layercake.checkpoint import open_checkpoint
from layercake.config import load_config
from layercake.errors import LayercakeError
from layercake.offload.tiers import ALIGN
from layercake.pipeline.pool import RangePool


class Reader:
    """Fills a slot with the unit's id (its offset here), counting reads."""

    def __init__(self) -> None:
        self.reads: list[int] = []
        self.lock = threading.Lock()

    def read_into(self, buf: torch.Tensor, offset: int, length: int, streams: int = 1) -> int:
        with self.lock:
            self.reads.append(offset)
        buf[:length] = offset
        return length


def cycle(pool: RangePool, keys: list, ahead: int = 0) -> None:
    """One step through every unit in order, each read checked (``ahead``: units submitted
    before their turn, as the executor's look-ahead does)."""
    for i, k in enumerate(keys):
        for n in keys[i : i + 1 + ahead]:
            pool.submit(n)
        slot = pool.wait(k)
        assert int(slot[0]) == k[0] * 10 + k[1]  # the unit's own bytes, never another's
        pool.release(k)


@pytest.mark.parametrize("slots", [3, 4, 6])
def test_pool_reads_only_what_it_cannot_keep(slots):
    """Two ranges of three units through ``slots`` slots, visited in a cycle as decode steps
    do: after the first step a step reads only about ``units - slots`` units again (each read
    evicts the kept unit needed last), none when all fit; least-recently-used eviction would
    read all six every step."""
    reader = Reader()
    keys = [(r, u) for r in range(2) for u in range(3)]
    pool = RangePool([torch.zeros(8, dtype=torch.uint8) for _ in range(slots)],
                     {k: (reader, k[0] * 10 + k[1], 8) for k in keys})  # fmt: skip
    cycle(pool, keys)
    assert len(reader.reads) == 6
    for _ in range(4):
        before = len(reader.reads)
        cycle(pool, keys)
        got = len(reader.reads) - before
        assert got == 0 if slots == 6 else 6 - slots <= got <= 7 - slots
    assert sum(pool.bytes_read.values()) == 8 * len(reader.reads)
    assert pool.hits == 4 * 6 - (len(reader.reads) - 6)  # the rest were kept in their slots


def test_pool_prefetch_of_the_next_range_evicts_only_the_one_done():
    """The next range's units, read ahead while another node computes, take the slots of the
    range just done, never those of units submitted and not yet used."""
    reader = Reader()
    keys = [(r, u) for r in range(2) for u in range(2)]
    pool = RangePool([torch.zeros(8, dtype=torch.uint8) for _ in range(3)],
                     {k: (reader, k[0] * 10 + k[1], 8) for k in keys})  # fmt: skip
    cycle(pool, keys[:2], ahead=1)
    for k in keys[2:]:  # prefetch_after: range 1 while the others compute
        pool.submit(k)
    for k in keys[2:]:
        assert int(pool.wait(k)[0]) == k[0] * 10 + k[1]
    assert sorted(pool.kept) == [(0, 0)]  # range 0's first unit kept: needed next of them
    for k in keys[2:]:
        pool.release(k)
    view = pool.view(1, {0: (10, 8), 1: (11, 8)})
    view.wait(1)
    view.submit(0)  # the executor's load wrapping to the range's next pass: the pool's to do
    assert (1, 0) not in pool.items and (1, 1) in pool.items
    assert sorted(pool.bytes_read) == [0, 1]


def test_pool_keeps_a_range_over_the_pieces_of_a_pass():
    """A prompt in pieces runs a range once per piece: told so (``focus``), the pool keeps the
    range's units through the pass (no read after the first piece) and gives up the other
    range's instead; in plain cyclic order it would push out the range's own later units."""
    for told, want in ((True, 0), (False, 1)):
        reader = Reader()
        keys = [(0, u) for u in range(3)] + [(1, u) for u in range(4)]
        pool = RangePool([torch.zeros(8, dtype=torch.uint8) for _ in range(5)],
                         {k: (reader, k[0] * 10 + k[1], 8) for k in keys})  # fmt: skip
        cycle(pool, keys[:3])
        for piece in range(3):
            if told:
                pool.focus(1, 2 - piece)
            before = len(reader.reads)
            cycle(pool, keys[3:])
        assert (len(reader.reads) - before > 0) == bool(want)


def stage_of(tmp_path, llama5, budget, layers):  # noqa: F811
    from layercake.pipeline.stage import Stage
    from layercake.pipeline.topology import load_topology

    node = {"cpu_memory": budget, "offload_dir": str(tmp_path / "off"), "batch_size": 8,
            "num_batches": 1, "max_context": 16}  # fmt: skip
    topo = load_topology(topology(tmp_path, layers, options={"main": node}), 5)
    ckpt = open_checkpoint(llama5)
    return Stage(topo, 0, ckpt, load_config(ckpt.config_dict()), llama5), node


def test_ranges_share_one_pool_and_equal_the_single_process(tmp_path, llama5, reference,  # noqa: F811
                                                             monkeypatch):  # fmt: skip
    """main holds 'b 0-1' and '3-5 e' under one cpu_memory: both ranges read through one pool
    of as many slots as the budget leaves (3 for its 4-5 units here, so units are read again
    every step), the plan says so, and the job's tokens are the single process's."""
    monkeypatch.setattr(off, "process_rss", lambda: 0)  # a budget in slots, whatever the
    monkeypatch.setattr(off, "SAFETY", 0)  # test process holds
    layers = ["b 0-1 3-5 e", "1-3"]
    big, _ = stage_of(tmp_path, llama5, "1GB", layers)
    fixed = sum(v for k, v in big.pool.memory.items() if k not in ("pool", "process_and_safety"))
    slot = len(big.pool.slots[0])
    # every unit: b 0-1's layer, 3-5's two, the head's slabs
    assert len(big.pool.slots) == len(big.pool.sources) >= 4
    stage, node = stage_of(tmp_path, llama5, fixed + 3 * slot + slot // 2, layers)
    plan = stage.report()["memory"]
    assert len(stage.pool.slots) == 3 and plan["pool"]["slots"] == 3
    assert {r.loader.pool for r in stage.runners.values()} == {stage.pool}
    with pytest.raises(LayercakeError, match="streaming them needs 3 slots"):
        stage_of(tmp_path, llama5, fixed + 2 * slot, layers)
    alone, _ = stage_of(tmp_path, llama5, "1GB", ["b 3-5 e", "0-3"])  # 'b' alone streams nothing
    assert {k[0] for k in alone.pool.sources} == {1} and len(alone.runners) == 2
    topo = topology(tmp_path, layers, name="job.json", options={"main": node}, prefill_chunks=2)
    with workers(topo, llama5, ["pc2"], "--once"), job(llama5, topo) as llm:
        out = llm.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)
        assert [o.token_ids for o in out] == reference
        pool = llm.runner.stage.pool
        report = llm.runner.stage.report()
    # (a read-ahead for the next step may still be under way when the report is taken)
    assert pool.hits > 0 and 0 < report["disk_bytes"] <= sum(pool.bytes_read.values())


def test_pool_measures_the_process_after_giving_back_its_free_heap(tmp_path, llama5,  # noqa: F811
                                                                    monkeypatch):  # fmt: skip
    """The pool's slots are whole units: the process is measured for the plan once glibc's free
    heap is back with the system (``malloc_trim``), not with what loading freed."""
    import layercake.offload.executor as executor

    calls = []
    monkeypatch.setattr(executor, "trim_heap", lambda: calls.append("trim"))
    monkeypatch.setattr(off, "process_rss", lambda: calls.append("rss") or 0)
    monkeypatch.setattr(off, "SAFETY", 0)
    stage_of(tmp_path, llama5, "1GB", ["b 0-1 3-5 e", "1-3"])
    assert calls[-2:] == ["trim", "rss"]


def belady_reads(sequence: list, slots: int) -> int:
    """Belady's minimum: the fewest reads that serve ``sequence`` through ``slots`` slots, the
    whole sequence known (on a miss with every slot full, give up the unit used furthest
    ahead, or never again)."""
    held: set = set()
    reads = 0
    for i, key in enumerate(sequence):
        if key in held:
            continue
        reads += 1
        if len(held) == slots:
            rest = sequence[i + 1 :]
            held.remove(max(held, key=lambda k: rest.index(k) if k in rest else len(rest)))
        held.add(key)
    return reads


def test_belady_reads_by_hand():
    """The offline count itself, on sequences small enough to count by hand."""
    assert belady_reads([1, 2, 3, 1, 2, 3], 3) == 3  # all fit: each read once
    assert belady_reads([1, 2, 3, 1, 2, 3], 2) == 4  # 1 2 | 3 evicts 2 | 1 | 2 evicts 1 | 3
    assert belady_reads([1, 2, 3, 4, 1, 2, 3, 4], 3) == 5


@pytest.mark.parametrize("units,slots,pieces", [((3, 3), 4, 1), ((5, 5), 8, 1), ((3, 8), 8, 1),
                                                ((2, 4), 3, 1), ((3, 4), 5, 3)])  # fmt: skip
def test_pool_at_demand_reads_beladys_minimum(units, slots, pieces):
    """Without read-ahead (``lead`` 0) the pool reads exactly Belady's minimum for its slots:
    decode steps through two ranges (``units`` each: h0 of ``ranges-10`` is (5, 5) through 8),
    and a prompt whose second range runs once per piece (``focus``)."""
    reader = Reader()
    keys = [(r, u) for r in range(2) for u in range(units[r])]
    pool = RangePool([torch.zeros(8, dtype=torch.uint8) for _ in range(slots)],
                     {k: (reader, k[0] * 10 + k[1], 8) for k in keys})  # fmt: skip
    sequence = []
    for step in range(6):
        for r in range(2):
            passes = pieces if step == 0 and r == 1 else 1
            for p in range(passes):
                pool.focus(r, passes - p - 1)
                sequence += [k for k in keys if k[0] == r]
                cycle(pool, [k for k in keys if k[0] == r])
    assert len(reader.reads) == belady_reads(sequence, slots)


class Disk(Reader):
    """A file whose every page holds its own number: a unit's bytes are checkable anywhere."""

    def __init__(self, pages: int) -> None:
        super().__init__()
        self.data = (torch.arange(pages * ALIGN) // ALIGN).to(torch.uint8)
        self.lengths: list[int] = []

    def read_into(self, buf: torch.Tensor, offset: int, length: int, streams: int = 1) -> int:
        with self.lock:
            self.reads.append(offset)
            self.lengths.append(length)
        buf[:length] = self.data[offset : offset + length]
        return length


def test_pool_prefix_reads_only_the_rest_and_serves_whole_units_without_a_slot():
    """Memory beside the slots keeps the first bytes of the units used last: a unit kept
    whole there is computed from it (no slot, no read after its first), a unit kept in part
    copies its first bytes and reads the rest; the other units share the slots as before."""
    disk = Disk(16)
    keys = [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    at = {k: 2 * i for i, k in enumerate(keys)}  # pages; (1, 2) is one page long
    sources = {k: (disk, at[k] * ALIGN, (1 if k == (1, 2) else 2) * ALIGN) for k in keys}
    pool = RangePool([torch.zeros(2 * ALIGN, dtype=torch.uint8) for _ in range(3)], sources,
                     prefix=torch.zeros(2 * ALIGN, dtype=torch.uint8))  # fmt: skip
    assert {k: len(v[0]) for k, v in pool.prefix.items()} == {(1, 2): ALIGN, (1, 1): ALIGN}
    for _ in range(4):
        for k in keys:
            slot, (_, offset, length) = pool.wait(k), sources[k]
            assert torch.equal(slot[:length], disk.data[offset : offset + length])
            pool.release(k)
            assert len(pool.kept) + len(pool.free) == 3  # (1, 2) holds no slot once kept
    assert disk.reads[:5] == [at[k] * ALIGN for k in keys]  # the first step reads them whole
    later = disk.reads[5:]
    assert at[(1, 2)] * ALIGN not in later  # served from the prefix memory
    assert at[(1, 1)] * ALIGN not in later and (at[(1, 1)] + 1) * ALIGN in later
    tail = [n for o, n in zip(disk.reads, disk.lengths) if o == (at[(1, 1)] + 1) * ALIGN]
    assert tail and set(tail) == {ALIGN}  # its second page only
    assert sum(pool.bytes_read.values()) == sum(disk.lengths)

"""Rank 0's large per-step tensors stay out of glibc's heap: a greedy step's (B, V) logits and
large received frames live in mappings of their own (``tiers.mapped_empty``), a generation lets
go of a step's logits before the next forward, and a frame that is out lets go of its tensors.
From the heap, each step's 33 MB (batch 64, Llama-3.2-1B's vocabulary) left holes the next ones
did not fit, and rank 0 grew by 1-3 such holes from run to run past its memory cap."""

from __future__ import annotations

import weakref

import torch
from test_pipeline import PROMPTS, job, llama5, reference, topology, workers  # noqa: F401

from layercake.offload.tiers import ALIGN, mapped_empty
from layercake.pipeline import transport as tr
from layercake.pipeline.topology import load_topology


def mapping_of(address: int) -> str | None:
    """The path column of the /proc/self/maps line that holds ``address`` ('' for an anonymous
    mapping, '[heap]' for glibc's main heap), or None where nothing is mapped."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= address < hi:
                return " ".join(fields[5:])
    return None


def outside_the_heap(t: torch.Tensor) -> bool:
    """In an anonymous mapping of its own: page-aligned, not glibc's ``[heap]`` (adjacent
    anonymous mappings may be merged by the kernel, so the mapping's size says nothing)."""
    p = t.untyped_storage().data_ptr()
    return p % ALIGN == 0 and mapping_of(p) == ""


def test_mapped_empty_is_a_mapping_of_its_own_gone_with_its_last_view():
    t = mapped_empty((64, 1, 32768), torch.float32)  # 8 MB
    p = t.untyped_storage().data_ptr()
    assert outside_the_heap(t) and t.is_contiguous()
    view = t.fill_(2.0)[:, -1]
    del t
    assert mapping_of(p) == "" and float(view.sum()) == 64 * 32768 * 2
    del view
    assert mapping_of(p) is None  # unmapped
    assert mapped_empty((0, 7), torch.float32).shape == (0, 7)


def test_greedy_logits_are_mapped_and_dropped_before_the_next_step(tmp_path, llama5, reference):  # noqa: F811
    topo = topology(tmp_path, ["b 0-3", "3-5 e"])
    with workers(topo, llama5, ["pc2"], "--once"), job(llama5, topo) as llm:
        runner, inner, last = llm.runner, llm.runner.forward, []

        def forward(*a, **kw):
            # the generation holds no earlier step's logits while it asks for the next ones
            assert all(r() is None for r in last)
            out = inner(*a, **kw)
            assert outside_the_heap(out)
            last.append(weakref.ref(out))
            return out

        runner.forward = forward
        out = llm.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)
        assert [o.token_ids for o in out] == reference and len(last) == 6


class FakeWork:
    def __init__(self, done: bool) -> None:
        self.done, self.waited = done, False

    def is_completed(self) -> bool:
        return self.done

    def wait(self, timeout=None) -> bool:
        self.waited = True
        return True


def test_frames_that_are_out_let_go_of_their_tensors(tmp_path, monkeypatch):
    topo = load_topology(topology(tmp_path, ["b 0-3", "3-5 e"]), 5)
    t = tr.Transport(topo.nodes, 0, 5.0)
    works: list[FakeWork] = []

    def isend(x, dst):
        works.append(FakeWork(done=False))
        return works[-1]

    monkeypatch.setattr(tr.dist, "isend", isend)
    t.send(1, tr.Kind.DATA, (1, 0), [torch.zeros(4, 8)])
    t.send(1, tr.Kind.DATA, (1, 1), [torch.zeros(4, 8)])
    assert len(t.pending) == 2  # nothing out yet: both held
    for w in works:
        w.done = True
    t.send(1, tr.Kind.DATA, (1, 2), [torch.zeros(4, 8)])
    assert len(t.pending) == 1 and t.pending[0][1][0] is works[-2]  # the two out were let go,
    assert all(w.waited for w in works[:4])  # their results taken (a failure raises there)

"""The engine thread: requests from the event loop go through an inbox into the continuous-
batching ``Engine``; each token goes back to its request's asyncio queue.

A request whose own step fails (its sampler raised) gets that error alone; the other sequences
keep decoding. Only a failure of the whole step (e.g. the forward pass) fails every request in
flight, and the engine is rebuilt so the server keeps serving."""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import sys
import threading
from typing import TYPE_CHECKING

from layercake.engine import Engine, Request, default_capacity
from layercake.generate import GenerationStats, StepEvent
from layercake.sampling import SamplingParams

if TYPE_CHECKING:
    from layercake.llm import LLM
    from layercake.server.metrics import Metrics


class Reply:
    """Where the engine thread puts one request's events (thread-safe into the event loop)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, index: int) -> None:
        self.loop, self.index = loop, index
        self.queue: asyncio.Queue[StepEvent | Exception] = asyncio.Queue()

    def put(self, item: StepEvent | Exception) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed (shutting down): nobody is listening
            pass


class EngineLoop:
    """The engine and the thread that steps it; ``slots_in_use`` and ``waiting`` are read by
    /health and /metrics."""

    def __init__(
        self, llm: LLM, slots: int, context: int, metrics: Metrics, verbose: bool = False
    ) -> None:
        """``verbose``: each time the engine runs dry, a roofline line for the work since it
        last did (``bench.roofline``) on stderr."""
        self.llm, self.slots, self.context, self.metrics = llm, slots, context, metrics
        self.verbose = verbose
        self.engine = self._new_engine()
        self._since = dataclasses.replace(self.engine.stats)  # the stats when last idle
        self.inbox: queue.Queue[Request | None] = queue.Queue()
        self.live: list[Request] = []  # added to the engine, not finished (engine thread only)
        self.slots_in_use = self.waiting = 0
        self.thread = threading.Thread(target=self._run, daemon=True, name="layercake-engine")
        self.thread.start()

    def _new_engine(self) -> Engine:
        return new_engine(self.llm, self.slots, self.context)

    def check(self, req: Request) -> None:
        """Raise LayercakeError if ``req`` cannot run here (pure: safe from any thread)."""
        self.engine.check(req.prompt, req.params)

    def submit(self, req: Request) -> None:
        """Queue a checked request for the engine thread."""
        self.inbox.put(req)

    def stop(self) -> None:
        self.inbox.put(None)
        self.thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def _run(self) -> None:
        while self._take_inbox():
            try:
                self._step()
            except Exception as e:  # the whole step failed: fail what is in flight, go on
                self._fail_all(e)

    def _step(self) -> None:
        eng = self.engine
        prompt, generated = eng.stats.prompt_tokens, eng.stats.generated_tokens
        events = eng.step()
        for req, ev in events:
            req.tag.put(ev)
        for req in self.live:
            if req.error is not None:  # this request alone failed
                req.tag.put(req.error)
        self.live = [r for r in self.live if not (r.finished or r.cancelled)]
        self.metrics.count_tokens(
            eng.stats.generated_tokens - generated, eng.stats.prompt_tokens - prompt
        )
        self._gauges()
        if self.verbose and not eng.busy and self.inbox.empty():
            self._report()

    def _report(self) -> None:
        """The roofline of the work since the engine last ran dry (one busy period)."""
        from layercake.bench.roofline import roofline_line

        now, was = self.engine.stats, self._since
        self._since = dataclasses.replace(now)
        delta = GenerationStats(batch_size=self.slots)
        for f in dataclasses.fields(GenerationStats):
            if f.name != "batch_size":
                setattr(delta, f.name, getattr(now, f.name) - getattr(was, f.name))
        if delta.decode_steps:  # a step runs the live rows only: its mean row count, not slots
            delta.batch_size = max(1, round(delta.decode_tokens / delta.decode_steps))
        print(f"layercake: served {delta.generated_tokens} tokens, prefill "
              f"{delta.prefill_tok_s:.1f} tok/s, decode {delta.decode_tok_s:.1f} tok/s; "
              f"{roofline_line(self.llm, delta)}", file=sys.stderr, flush=True)  # fmt: skip

    def _take_inbox(self) -> bool:
        """Move new requests into the engine (waiting for one when idle); False to stop."""
        block = not self.engine.busy
        while True:
            try:
                req = self.inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if req is None:
                return False
            if req.cancelled:
                continue
            try:
                self.engine.add(req)
            except Exception as e:  # checked on submit already; never fatal here
                req.tag.put(e)
                continue
            self.live.append(req)

    def _fail_all(self, e: Exception) -> None:
        for r in self.live:
            if not r.finished:
                r.tag.put(e)
        self.live = []
        self.engine = self._new_engine()
        self._since = dataclasses.replace(self.engine.stats)
        self._gauges()

    def _gauges(self) -> None:
        eng = self.engine
        self.slots_in_use = sum(s is not None for s in eng.seqs)
        self.waiting = len(eng.waiting) + self.inbox.qsize()


def new_engine(llm: LLM, slots: int, context: int) -> Engine:
    """The server's engine: ``slots`` rows, each sequence within ``context`` tokens."""
    return Engine(llm.runner, llm.eos_token_ids, llm._decode, slots, default_capacity(context))


def warm_up(llm: LLM, slots: int, context: int) -> None:
    """Run one decode step at each row count (``Engine.buckets``) and cache size (the starting
    one, and the whole capacity where steps are compiled) the server's engine uses, so every
    compiled graph is built before the first request instead of stalling one (progress lines
    say so while it compiles)."""
    eng = new_engine(llm, slots, context)
    spans = [3]  # generated tokens of a request that fits the starting size
    if eng.two_sizes and eng.capacity > eng.initial:
        n = eng.max_span - 2  # the longest request: the engine grows to the whole capacity
        spans += [n] if default_capacity(2 + n) > eng.initial else []
    token = llm.eos_token_ids[0] if llm.eos_token_ids else 0
    for n in spans:
        for rows in eng.buckets or [slots]:
            # two prompt tokens: a one-token prompt's prefill would be a (compiled) one-row step
            params = SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True)
            reqs = [Request([token, token], params) for _ in range(rows)]
            for req in reqs:
                eng.add(req)
            eng.step()  # admits them (prefill) and runs one decode step of ``rows`` rows
            for req in reqs:
                req.cancelled = True
            eng.step()  # frees their slots

"""The batch job: JSONL requests in, JSONL results out, resumable.

Every result is one line written with a single ``write`` and ``fsync`` (``jobs.output``): a
crash never leaves more than a partial last line, which the next run cuts off before it collects
the ids already done and skips them. Requests run through continuous-batching ``Engine``s, one
per group of similar lengths (``length_groups``: a few long lines get fewer cache rows instead
of sizing every row), longest first; multiple-choice lines are scored.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from layercake.engine import Engine, Request, default_capacity
from layercake.errors import LayercakeError
from layercake.generate import GenerationStats, check_prompt, score
from layercake.jobs.lines import read_lines
from layercake.jobs.output import Output
from layercake.jobs.requests import SAMPLING_FIELDS, RequestError, parse_sampling, prompt_ids
from layercake.jobs.requests import token_text as _token_text

if TYPE_CHECKING:
    from layercake.llm import LLM

LINE_FIELDS = {"id", "prompt", "messages", "choices", "logprobs", "allow_special_tokens",
               *SAMPLING_FIELDS}  # fmt: skip


@dataclass
class Job:
    """The parsed, not yet answered requests of an input file."""

    generate: list[Request] = field(default_factory=list)
    choices: list[tuple[dict[str, Any], list[int]]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0
    total: int = 0


def read_job(llm: LLM, path: Path, done: set[str], defaults: dict[str, Any], limit: int) -> Job:
    """Parse the input; a bad line becomes an error result, a file-level problem an exception."""
    job = Job()
    for line in read_lines(path):
        job.total += 1
        if line.key in done:
            job.skipped += 1
        elif line.body is None:
            job.errors.append({"id": line.id, "line": line.number, "error": line.error})
        else:
            try:
                job_line(llm, line.body, job, defaults, limit)
            except LayercakeError as e:
                job.errors.append({"id": line.id, "error": str(e)})
    return job


def job_line(
    llm: LLM, body: dict[str, Any], job: Job, defaults: dict[str, Any], limit: int
) -> None:
    unknown = sorted(set(body) - LINE_FIELDS)
    if unknown:
        raise RequestError(f"unknown field {unknown[0]!r}", unknown[0])
    ids = prompt_ids(llm, body)
    if body.get("choices") is not None:
        choices = body["choices"]
        if (
            not isinstance(choices, list)
            or not choices
            or not all(isinstance(c, str) and c for c in choices)
        ):
            raise RequestError("choices must be a non-empty list of non-empty strings", "choices")
        job.choices.append((body, ids))
        return
    params = parse_sampling(body, defaults)
    check_prompt(
        "the prompt",
        ids,
        params,
        llm.runner.vocab_size,
        limit,
        "the context" if limit == llm.runner.max_context else "--max-context",
    )
    job.generate.append(Request(ids, params, tag=body["id"]))


def score_line(llm: LLM, body: dict[str, Any], ids: list[int]) -> dict[str, Any]:
    conts = [llm.tokenizer.encode(c, add_special_tokens=False) for c in body["choices"]]
    results = score(llm.runner, ids, conts)
    best = max(range(len(results)), key=lambda j: results[j].logprob_sum)
    return {
        "id": body["id"],
        "best": best,
        "text": body["choices"][best],
        "choices": [
            {
                "text": c,
                "logprob": r.logprob_sum,
                "logprob_mean": r.logprob_mean,
                "is_greedy": r.is_greedy,
            }
            for c, r in zip(body["choices"], results)
        ],
        "prompt_tokens": len(ids),
    }


class Progress:
    """A tqdm bar on a terminal, else a plain line every ``every`` seconds."""

    def __init__(self, total: int, stream: TextIO, every: float = 10.0) -> None:
        self.total, self.stream, self.every = total, stream, every
        self.done, self.tokens, self.t0, self.last = 0, 0, time.perf_counter(), 0.0
        self.bar = None
        if stream.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="prompt", file=stream, dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, prompts: int, tokens: int) -> None:
        self.done += prompts
        self.tokens += tokens
        elapsed = time.perf_counter() - self.t0
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        if self.bar is not None:
            self.bar.set_postfix_str(f"{rate:.1f} tok/s", refresh=False)
            self.bar.update(prompts)
        elif (elapsed - self.last >= self.every and prompts) or self.done == self.total:
            self.last = elapsed
            eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
            print(
                f"layercake batch: {self.done}/{self.total} prompts, {rate:.1f} tok/s, "
                f"ETA {eta:.0f} s",
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_batch(
    llm: LLM,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    slots: int = 32,
    defaults: dict[str, Any] | None = None,
    max_context: int | None = None,
    log: TextIO | None = None,
) -> dict[str, Any]:
    """Answer every request of ``input_path`` not yet in ``output_path``; returns the summary
    (counts, prefill / decode / total tok/s, peak RSS)."""
    t_start = time.perf_counter()
    out = Output(Path(output_path))
    limit = min(max_context or llm.runner.max_context, llm.runner.max_context)
    job = read_job(llm, Path(input_path), out.done, defaults or {}, limit)
    todo = len(job.errors) + len(job.choices) + len(job.generate)
    progress = Progress(todo, log or sys.stderr)
    try:
        for row in job.errors:
            out.write(row)
            progress.update(1, 0)
        for body, ids in job.choices:
            try:
                row = score_line(llm, body, ids)
            except LayercakeError as e:
                row = {"id": body["id"], "error": str(e)}
            out.write(row)
            progress.update(1, 0)
        stats = _generate(llm, job.generate, slots, out, progress)
    finally:
        progress.close()
        out.close()
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "input_lines": job.total,
        "skipped_done": job.skipped,
        "written": todo,
        "errors": len(job.errors),
        "scored": len(job.choices),
        "generated": len(job.generate),
        "batch_size": slots,
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.generated_tokens,
        "prefill_s": round(stats.prefill_s, 3),
        "decode_s": round(stats.decode_s, 3),
        "decode_steps": stats.decode_steps,
        "prefill_tok_s": round(stats.prefill_tok_s, 2),
        "decode_tok_s": round(stats.decode_tok_s, 2),
        "throughput_tok_s": round(stats.throughput, 2),
        "wall_s": round(time.perf_counter() - t_start, 3),
        "peak_rss_gb": round(rss_kb * 1024 / 1e9, 3),
    }


@dataclass
class Group:
    """Requests run together in one engine of ``slots`` rows and ``capacity`` slots per row."""

    requests: list[Request]
    slots: int
    capacity: int


def span(r: Request) -> int:
    """Cache slots a request needs: its prompt and everything it may generate."""
    return len(r.prompt) + r.params.max_new_tokens


def length_groups(reqs: list[Request], slots: int, fixed: bool = False) -> list[Group]:
    """Split the requests, longest spans first, into groups that each run in their own engine
    with a cache of at most ``slots`` rows x the group's longest span. The budget is the cache
    of ``slots`` rows of twice the typical (90th-percentile) span: groups up to that length get
    every row, longer ones fewer, down to one, so a few long lines never size every row. A group
    takes requests down to half its longest span (at most 2x cache per row unused), or all the
    rest once it has every row. ``fixed``: one group of ``slots`` rows (a runner that plans its
    cache for its batch)."""
    order = sorted(reqs, key=lambda r: (-span(r), -len(r.prompt)))
    if fixed or not order:
        return [Group(order, slots, default_capacity(span(order[0])))] if order else []
    spans = sorted(map(span, order))
    budget = slots * default_capacity(2 * spans[int(0.9 * (len(spans) - 1))])
    groups, i = [], 0
    while i < len(order):
        top = span(order[i])
        cap = default_capacity(top)
        rows = max(1, min(slots, budget // cap))
        j = i + 1
        while j < len(order) and (rows == slots or 2 * span(order[j]) > top):
            j += 1
        groups.append(Group(order[i:j], rows, cap))
        i = j
    return groups


def _generate(llm: LLM, reqs: list[Request], slots: int, out: Output, progress: Progress) -> Any:
    total = GenerationStats(batch_size=slots)
    fixed = getattr(llm.runner, "block_size", None) is not None  # offloading: its planned block
    for g in length_groups(reqs, slots, fixed):
        n = min(g.slots, len(g.requests))
        engine = Engine(llm.runner, llm.eos_token_ids, llm._decode, n, g.capacity, g.capacity)
        for r in sorted(g.requests, key=lambda r: -len(r.prompt)):  # similar lengths together
            engine.add(r)
        _drain(llm, engine, out, progress)
        for f in dataclasses.fields(GenerationStats):
            if f.name != "batch_size":
                setattr(total, f.name, getattr(total, f.name) + getattr(engine.stats, f.name))
        del engine  # its cache goes before the next group's
    return total


def _drain(llm: LLM, engine: Engine, out: Output, progress: Progress) -> None:
    """Step the engine to the end, writing each request's result as it finishes."""
    state: dict[int, dict[str, Any]] = {}
    while engine.busy:
        for req, ev in engine.step():
            s = state.setdefault(id(req), {"text": "", "n": 0, "logprobs": []})
            s["text"] += ev.text
            s["n"] += 1
            if ev.logprob is not None:
                s["logprobs"].append(_logprob(llm, ev.logprob))
            if ev.finish_reason is None:
                continue
            row = {
                "id": req.tag,
                "text": s["text"],
                "finish_reason": ev.finish_reason,
                "prompt_tokens": len(req.prompt),
                "completion_tokens": s["n"],
            }
            if req.params.logprobs is not None:
                row["logprobs"] = s["logprobs"]
            out.write(row)
            del state[id(req)]
            progress.update(1, s["n"])


def _logprob(llm: LLM, lp: Any) -> dict[str, Any]:
    return {
        "token": _token_text(llm, lp.token_id),
        "logprob": lp.logprob,
        "top_logprobs": {_token_text(llm, t): v for t, v in lp.top_logprobs.items()},
    }

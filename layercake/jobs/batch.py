"""The batch job: JSONL requests in, JSONL results out, resumable.

Every result is one line written with a single ``write`` and ``fsync``: a crash never leaves
more than a partial last line, which the next run cuts off before it collects the ids already
done and skips them. Requests run through the continuous-batching ``Engine``, longest prompts
first (so the slots hold prompts of similar lengths); multiple-choice lines are scored.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from layercake.engine import Engine, Request, default_capacity
from layercake.errors import LayercakeError
from layercake.generate import check_prompt, score
from layercake.jobs.requests import SAMPLING_FIELDS, RequestError, parse_sampling, prompt_ids
from layercake.jobs.requests import token_text as _token_text

if TYPE_CHECKING:
    from layercake.llm import LLM

LINE_FIELDS = {"id", "prompt", "messages", "choices", "logprobs", *SAMPLING_FIELDS}


class Output:
    """The results file, appended to one whole line at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: set[str] = set()  # keys (see ``line_key``) of the lines already answered
        if path.is_dir():
            raise LayercakeError(f"output {path} is a directory")
        if not path.parent.is_dir():
            raise LayercakeError(f"output directory {path.parent} does not exist")
        if path.exists():
            self._resume()
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise LayercakeError(f"cannot write output {path}: {e.strerror}") from None

    def _resume(self) -> None:
        try:
            data = self.path.read_bytes()
        except OSError as e:
            raise LayercakeError(f"cannot read output {self.path}: {e.strerror}") from None
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a line cut short by a crash: dropped, it will be redone
            os.truncate(self.path, end)
        for n, raw in enumerate(data[:end].splitlines(), 1):
            try:
                row = json.loads(raw)
                self.done.add(line_key(row.get("id"), row.get("line")))
            except (ValueError, AttributeError):
                raise LayercakeError(
                    f"output {self.path} line {n} is not a result line of this job; "
                    "give another output path"
                ) from None

    def write(self, row: dict[str, Any]) -> None:
        data = (json.dumps(row, ensure_ascii=False) + "\n").encode()
        view = memoryview(data)
        while view:  # one write for a regular file; the loop only guards a short write
            view = view[os.write(self.fd, view) :]
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def line_key(id_: Any, line: int | None) -> str:
    """What identifies a request across runs: its id, or its line number when it has none."""
    return "id:" + json.dumps(id_) if id_ is not None else f"line:{line}"


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
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise LayercakeError(f"cannot read input {path}: {reason}") from None
    job, seen = Job(), {}
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        job.total += 1
        id_ = None
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise RequestError("the line is not a JSON object")
            id_ = body.get("id")
            if id_ is not None and (isinstance(id_, bool) or not isinstance(id_, (str, int))):
                id_ = None
                raise RequestError("id must be a string or an integer")
            if id_ is None:
                raise RequestError("missing id")
            key = line_key(id_, n)
            if key in seen:
                raise LayercakeError(
                    f"input line {n}: id {id_!r} was already used on line "
                    f"{seen[key]}; ids must be unique"
                )
            seen[key] = n
        except ValueError as e:
            body, key = None, line_key(None, n)
            error = f"line {n} is not JSON: {e}"
        except RequestError as e:
            body, key, error = None, line_key(id_, n), f"line {n}: {e}"
        if key in done:
            job.skipped += 1
            continue
        if body is None:
            job.errors.append({"id": id_, "line": n, "error": error})
            continue
        try:
            job_line(llm, body, job, defaults, limit)
        except LayercakeError as e:
            job.errors.append({"id": id_, "error": str(e)})
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
        "prefill_tok_s": round(stats.prefill_tok_s, 2),
        "decode_tok_s": round(stats.decode_tok_s, 2),
        "throughput_tok_s": round(stats.throughput, 2),
        "wall_s": round(time.perf_counter() - t_start, 3),
        "peak_rss_gb": round(rss_kb * 1024 / 1e9, 3),
    }


def _generate(llm: LLM, reqs: list[Request], slots: int, out: Output, progress: Progress) -> Any:
    from layercake.generate import GenerationStats

    if not reqs:
        return GenerationStats(batch_size=slots)
    span = max(len(r.prompt) + r.params.max_new_tokens for r in reqs)
    slots = min(slots, len(reqs))
    engine = Engine(llm.runner, llm.eos_token_ids, llm._decode, slots, default_capacity(span))
    for r in sorted(reqs, key=lambda r: -len(r.prompt)):  # grouped by length, longest first
        engine.add(r)
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
    return engine.stats


def _logprob(llm: LLM, lp: Any) -> dict[str, Any]:
    return {
        "token": _token_text(llm, lp.token_id),
        "logprob": lp.logprob,
        "top_logprobs": {_token_text(llm, t): v for t, v in lp.top_logprobs.items()},
    }

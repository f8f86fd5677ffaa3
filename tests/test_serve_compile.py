"""``serve`` compiles its one-token step by default (built before it listens, at the two cache
sizes its engine uses), ``--no-compile`` turns that off, a failed compile falls back to eager
steps (or is an error with ``--compile``); ``-v`` on batch and serve prints the path and the
roofline line. The compiled step itself is stood in for by the eager one (the same forward, the
static-shape path), so these tests never wait for torch.compile."""

from __future__ import annotations

import argparse
import json
import time

import pytest

from layercake.cli import build_parser, main
from layercake.engine import Engine, Request
from layercake.errors import LayercakeError
from layercake.sampling import SamplingParams
from layercake.server.compiled import serve_compiles, step_mode, warmed_up
from layercake.server.engine_loop import EngineLoop, warm_up
from layercake.server.metrics import Metrics


def parse(*args: str) -> argparse.Namespace:
    return build_parser().parse_args(list(args))


def test_serve_compiles_by_default_where_a_compiled_step_runs() -> None:
    """By default on CUDA in memory; on the CPU eager steps are faster, so only with --compile."""
    assert parse("serve").compile is None  # decided by serve_compiles
    assert parse("serve", "--no-compile").compile is False
    assert parse("serve", "--compile").compile is True
    assert parse("generate", "--prompt", "x").compile is False
    cuda = ["--device", "cuda"]
    assert serve_compiles(parse("serve", *cuda))
    assert serve_compiles(parse("serve", *cuda, "--compress-weight", "--packed"))
    percent = ["--percent", "100", "0", "100", "0", "100", "0"]
    for flags in (["--cpu-memory", "1GB"], ["--batch-size", "16"], ["--compress-weight"], percent):
        assert not serve_compiles(parse("serve", *cuda, *flags)), flags
    for flags in ([], ["--device", "cpu"], ["--packed"], ["--device", "mps"]):
        assert not serve_compiles(parse("serve", *flags)), flags


def test_serve_says_why_its_steps_are_compiled_or_eager() -> None:
    """``serve -v`` names the step mode and the reason (issue 18: -v says which path and why)."""

    def mode(*flags: str) -> str:
        a = parse("serve", *flags)
        default = a.compile is None
        if default:
            a.compile = serve_compiles(a)
        return step_mode(a, default)

    assert mode().startswith("eager (the default on the CPU")
    assert mode("--compile") == "compiled (--compile)"
    assert mode("--no-compile") == "eager (--no-compile)"
    assert mode("--device", "cuda") == "compiled (the default on CUDA in memory)"
    assert mode("--device", "cuda", "--cpu-memory", "1GB").startswith("eager (a compiled step")
    assert mode("--device", "mps") == "eager (the default on mps)"
    failed = parse("serve", "--device", "cuda")
    failed.compile = False  # what ``warmed_up`` leaves when the default's compile fails
    assert step_mode(failed, default=True) == "eager (the compile failed: see the warning above)"


@pytest.fixture
def stepped_llm(tiny_llama):
    """A model whose one-token steps take the compiled path with the eager forward standing in
    for the graph (so shapes, sizes and masks are exercised without compiling)."""
    import layercake

    llm = layercake.load(tiny_llama)
    llm.runner._step = llm.runner._run
    return llm


def test_engine_of_a_compiled_runner_uses_two_cache_sizes(stepped_llm, monkeypatch) -> None:
    """Growing the cache would compile a graph per size: a compiled runner's engine goes
    straight from its starting size to the whole capacity (not 1.5x what the request needs)."""
    llm = stepped_llm
    monkeypatch.setattr(llm.runner, "max_context", 4096)
    eng = Engine(llm.runner, [], lambda ids: "", slots=2, capacity=600, initial=16)
    assert eng.two_sizes and eng.cache.capacity == 256  # a compiled runner's sizes round up
    g = dict(temperature=0.0, ignore_eos=True)
    short = Request([3, 4, 5], SamplingParams(max_new_tokens=4, **g))
    eng.add(short)
    eng.run()
    assert eng.cache.capacity == 256 and short.finished
    long = Request([3, 4, 5], SamplingParams(max_new_tokens=175, **g))  # needs > 2/3 of 256
    eng.add(long)
    for _ in range(3):  # a few steps: positions stay within the tiny model's table
        eng.step()
    assert eng.cache.capacity == llm.runner.new_cache(1, 600).capacity == 768
    monkeypatch.setattr(eng, "two_sizes", False)  # what an eager runner's engine does instead
    long.cancelled = True
    eng.step()
    eng.add(Request([3, 4, 5], SamplingParams(max_new_tokens=175, **g)))
    eng.step()
    assert eng.cache.capacity == 512  # default_capacity(178) = 267, rounded up


def test_compiled_steps_run_the_smallest_bucket_of_rows(stepped_llm, monkeypatch) -> None:
    """A compiled engine forwards the live rows padded to a bucket (1, 2, 4, 8 of 8 slots: one
    graph each), the padding rows masked; every sequence equals its solo run."""
    from tests.test_engine import mixed_requests, run_checking_rows

    bucket = {1: 1, 2: 2, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8}
    reqs = mixed_requests(2, 16)
    seen = run_checking_rows(stepped_llm, reqs, 8, 40, bucket.get, monkeypatch)
    assert {bucket[n] for n in seen} == {1, 2, 4, 8} and len(set(seen)) > 4, seen


def test_warm_up_runs_a_step_at_each_size(stepped_llm, monkeypatch) -> None:
    llm, seen = stepped_llm, []
    forward = llm.runner.forward

    def spy(tokens, positions, cache, *a, **kw):  # noqa: ANN001, ANN002, ANN003
        seen.append((tokens.shape, cache.capacity))
        return forward(tokens, positions, cache, *a, **kw)

    monkeypatch.setattr(llm.runner, "forward", spy)
    warm_up(llm, 4, 100)  # starts at min(150, 256) -> 128 (the context); one size
    steps = {(tuple(shape)[0], cap) for shape, cap in seen if tuple(shape)[1] == 1}
    assert steps == {(1, 128), (2, 128), (4, 128)}, seen  # every bucket of rows
    seen.clear()
    monkeypatch.setattr(llm.runner, "max_context", 4096)  # now the capacity is past the start
    warm_up(llm, 4, 1000)
    steps = {(tuple(shape)[0], cap) for shape, cap in seen if tuple(shape)[1] == 1}
    caps = {cap for _, cap in steps}
    assert len(caps) == 2 and steps == {(b, c) for b in (1, 2, 4) for c in caps}, seen
    assert all(tuple(s)[1] <= 2 for s, _ in seen)  # 2-token prompts, one-token steps


def test_a_failed_compile_falls_back_or_is_an_error(tiny_llama, monkeypatch, capsys) -> None:
    import layercake
    from layercake.server import engine_loop

    def broken(*a, **kw):  # noqa: ANN002, ANN003
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(engine_loop, "warm_up", broken)
    a = parse("serve", "--model", str(tiny_llama))
    llm = layercake.load(tiny_llama)
    with pytest.raises(LayercakeError, match="did not compile: no C\\+\\+ compiler found$"):
        warmed_up(llm, a, 2, True, lambda: pytest.fail("no reload with --compile"))
    a.compile = True
    again = layercake.load(tiny_llama)
    assert warmed_up(llm, a, 2, False, lambda: again) is again and a.compile is False
    assert "warning: the one-token step did not compile (no C++ compiler found)" in (
        capsys.readouterr().err
    )


class _Collect:
    def __init__(self) -> None:
        self.events: list = []

    def put(self, ev) -> None:  # noqa: ANN001
        self.events.append(ev)


def test_serve_verbose_prints_the_roofline_when_idle(tiny_llama, tmp_path, monkeypatch, capsys):
    import torch

    import layercake
    from tests.test_bench import seed_limits

    monkeypatch.setenv("LAYERCAKE_CACHE", str(tmp_path / "cache"))
    seed_limits(tmp_path / "cache", torch.get_num_threads())
    loop = EngineLoop(layercake.load(tiny_llama), 2, 64, Metrics(), verbose=True)
    req = Request([5, 6, 7], SamplingParams(temperature=0.0, max_new_tokens=5, ignore_eos=True),
                  tag=_Collect())  # fmt: skip
    loop.submit(req)
    deadline = time.time() + 60
    while not (req.finished and not loop.engine.busy) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    loop.stop()
    err = capsys.readouterr().err
    assert len(req.tag.events) == 5
    assert "layercake: served 5 tokens" in err and "roofline: decode RAM" in err, err


def test_batch_verbose_prints_path_and_roofline(tiny_chat_llama, tmp_path, monkeypatch, capsys):
    import torch

    from tests.test_bench import seed_limits

    monkeypatch.setenv("LAYERCAKE_CACHE", str(tmp_path / "cache"))
    seed_limits(tmp_path / "cache", torch.get_num_threads())
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"id": str(i), "prompt": f"w{i} w2"}) + "\n"
                           for i in range(3)))  # fmt: skip
    code = main(["batch", "--model", str(tiny_chat_llama), "--input", str(src), "--output",
                 str(out), "--max-new-tokens", "4", "--ignore-eos", "-v"])  # fmt: skip
    _, err = capsys.readouterr()
    assert code == 0, err
    assert "[path: in memory, cpu" in err and "roofline: decode RAM" in err, err


def test_a_lookup_of_several_tokens_compiles_in_one_graph() -> None:
    """The embedding's read-ahead (``madvise`` per row of the ids) stays out of a compiled step:
    traced, the ids are data and the step failed to compile at 2 rows and more (serve then ran
    eager steps). Compiled as the runner compiles its step (one graph, static shapes)."""
    import torch

    from layercake.models.layers import Embedding

    emb = Embedding(50, 8)
    ids = torch.tensor([[3], [7]])
    step = torch.compile(emb.forward, fullgraph=True, dynamic=False, backend="eager")
    assert torch.equal(step(ids), emb(ids))

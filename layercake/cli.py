"""Command line: ``layercake generate | batch | serve | plan | bench | worker | split``. A user
mistake prints one line and exits 2, never a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from layercake.cli_options import (
    add_engine_options,
    add_sampling_options,
    sampling_kwargs,
)
from layercake.errors import LayercakeError


def load_from_args(a: argparse.Namespace, max_sequences: int | None = None):
    """The model the engine options describe; ``max_sequences`` bounds the block --policy auto
    plans (one for generate, the input's lines for batch)."""
    import layercake
    from layercake.options import Options

    options = Options.from_args(a, max_sequences=max_sequences)
    return layercake.load(a.model, options)


def cmd_generate(a: argparse.Namespace) -> int:
    from layercake.sampling import SamplingParams

    SamplingParams(**sampling_kwargs(a)).validate()  # a bad flag fails before the model loads
    llm = load_from_args(a, max_sequences=1)
    if a.chat:
        messages = [{"role": "system", "content": a.system}] if a.system else []
        prompt = llm.chat_prompt(messages + [{"role": "user", "content": a.prompt}])
    else:
        prompt = llm.tokenizer.encode(a.prompt)
    if a.verbose:
        print_path(llm)
    reason = None
    try:
        for ev in llm.stream(prompt, **sampling_kwargs(a)):
            sys.stdout.write(ev.text)
            sys.stdout.flush()
            reason = ev.finish_reason or reason
    finally:
        llm.close()
    sys.stdout.write("\n")
    s = llm.last_stats
    if a.verbose and s is not None:
        print(
            f"[{s.generated_tokens} tokens, finish={reason}, prefill {s.prefill_tok_s:.1f} tok/s, "
            f"decode {s.decode_tok_s:.1f} tok/s]",
            file=sys.stderr,
        )
        from layercake.bench.roofline import roofline_line

        print(roofline_line(llm, s), file=sys.stderr)
    return 0


def print_path(llm) -> None:  # noqa: ANN001
    """``-v``: which path runs the model, and why (the runner's own words)."""
    from layercake.bench.roofline import runner_path

    print(f"[path: {runner_path(llm.runner)}]", file=sys.stderr, flush=True)


def cmd_worker(a: argparse.Namespace) -> int:
    from layercake.pipeline.runner import run_worker

    run_worker(a.topology, a.name, a.model, a.once, a.connect_timeout, a.threads)
    return 0


def cmd_split(a: argparse.Namespace) -> int:
    from layercake.pipeline.split import split_checkpoint

    for name, d, nbytes in split_checkpoint(a.model, a.topology, a.out):
        print(f"{name}: {d} ({nbytes / 1e9:.2f} GB of tensors)")
    return 0


def add_dist_commands(sub: argparse._SubParsersAction) -> None:
    w = sub.add_parser("worker", help="serve a node's layers to a pipeline job")
    w.add_argument("--topology", required=True, help="the job's topology file")
    w.add_argument("--name", help="this node's name in it (default: the node at $RANK)")
    w.add_argument("--model", help="model path here (default: the node's or the file's 'model')")
    w.add_argument("--threads", type=int, help="CPU threads for torch")
    w.add_argument("--once", action="store_true", help="exit after one job")
    w.add_argument(
        "--connect-timeout", type=float, help="give up reaching rank 0 after this many seconds"
    )
    w.set_defaults(func=cmd_worker)
    s = sub.add_parser("split", help="write each node's part of a checkpoint")
    s.add_argument("--model", required=True, help="HF model directory")
    s.add_argument("--topology", required=True)
    s.add_argument("--out", required=True, help="directory: one subdirectory per node")
    s.set_defaults(func=cmd_split)


def no_topology(a: argparse.Namespace) -> None:
    """The continuous-batching engine moves cache rows in place; a pipeline's cache lives on
    several hosts and cannot yet."""
    if getattr(a, "topology", None):
        raise LayercakeError(
            f"layercake {a.command} does not run over a --topology yet; use layercake generate"
        )


def engine_slots(llm, a: argparse.Namespace, default: int = 32) -> int:
    """Sequences decoded together: the offload runner's block (its memory plan), else
    --batch-size (``default`` when not given)."""
    block = getattr(llm.runner, "block_size", None)
    if block:
        return block
    if a.batch_size is not None and a.batch_size < 1:
        raise LayercakeError(f"--batch-size must be at least 1, got {a.batch_size}")
    return a.batch_size or default


def cmd_batch(a: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from layercake.jobs.batch import run_batch
    from layercake.jobs.lines import read_lines
    from layercake.sampling import SamplingParams

    no_topology(a)
    defaults = sampling_kwargs(a)
    SamplingParams(**defaults).validate()  # bad flags, paths, ids fail before the model loads
    if not Path(a.input).is_file():
        raise LayercakeError(f"cannot read input {a.input}: no such file")
    out = Path(a.output)
    if not out.parent.is_dir():
        raise LayercakeError(f"output directory {out.parent} does not exist")
    lines = len(read_lines(Path(a.input)))  # raises on duplicate ids
    llm = load_from_args(a, max_sequences=max(1, lines))
    if a.verbose:
        print_path(llm)
    slots = engine_slots(llm, a)
    summary = run_batch(llm, a.input, a.output, slots, defaults, a.max_context)
    print(json.dumps(summary))
    if a.verbose:
        from layercake.bench.roofline import roofline_line
        from layercake.generate import GenerationStats

        keys = ("prompt_tokens", "prefill_s", "decode_s", "decode_steps")
        stats = GenerationStats(batch_size=slots, **{k: summary[k] for k in keys})
        print(roofline_line(llm, stats), file=sys.stderr)
    return 0


def serve_threads(a: argparse.Namespace) -> None:
    """``serve`` on the CPU without ``--threads``: one thread fewer than torch's choice (at least
    one), leaving a core to the event loop that takes requests and streams tokens. With every
    core computing, the event loop preempts one kernel thread and the others wait for it at the
    end of every op (the README's Server section has the measurement)."""
    import torch

    if a.threads is None and a.device == "cpu" and torch.get_num_threads() > 1:
        a.threads = torch.get_num_threads() - 1
        if a.verbose:
            print(f"[threads: {a.threads} for the model, a core left to the server; "
                  "--threads N to choose]", file=sys.stderr, flush=True)  # fmt: skip


def cmd_serve(a: argparse.Namespace) -> int:
    try:
        from layercake.server.app import serve
    except ImportError as e:
        raise LayercakeError(
            f"the server needs the serve extra ({e.name} is missing): "
            "pip install 'layercake[serve]'"
        ) from None
    no_topology(a)
    if a.host not in ("127.0.0.1", "localhost", "::1") and a.api_key is None:
        print(f"layercake: warning: serving on {a.host} without --api-key: anyone who can reach "
              "it can use it", file=sys.stderr)  # fmt: skip
    limits = {k: getattr(a, k) for k in ("max_body", "max_queue", "max_prompts")}
    for k, v in limits.items():
        if v is not None and v < (0 if k == "max_queue" else 1):
            raise LayercakeError(f"--{k.replace('_', '-')} is too small: {v}")
    from layercake.server.compiled import serve_compiles, step_mode, warmed_up

    explicit = a.compile is True  # --compile; None: serve's default, decided here
    default = a.compile is None
    if default:
        a.compile = serve_compiles(a)
    serve_threads(a)
    llm = load_from_args(a)
    slots = engine_slots(llm, a, default=8)
    if a.compile:
        llm = warmed_up(llm, a, slots, explicit, lambda: load_from_args(a))
    if a.verbose:
        from layercake.bench.limits import machine_limits

        print_path(llm)
        print(f"[steps: {step_mode(a, default)}]", file=sys.stderr, flush=True)
        machine_limits(getattr(llm.runner, "offload_dir", None))  # measured now, not mid-serve
    serve(
        llm, slots, a.max_context, a.host, a.port, a.api_key, verbose=a.verbose,
        **{k: v for k, v in limits.items() if v is not None},
    )  # fmt: skip
    return 0


def cmd_plan(a: argparse.Namespace) -> int:
    import json

    from layercake.offload.auto import plan_from_args

    plan = plan_from_args(a)
    if a.json:
        print(json.dumps(plan.to_json()))
    else:
        from layercake.offload.planner import describe

        print(describe(plan))
    return 0


def add_plan_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="pick an offloading policy for memory budgets from this machine's measured rates",
        description="Measures the machine once (disk reads in --offload-dir, matmul, host-device "
        "copies; cached in ~/.cache/layercake), times the model's layers, then searches batch "
        "size, micro-batches, placement and compression with a cost model and prints the "
        "fastest policy that fits, as engine flags, with its predicted throughput and memory.",
    )
    p.add_argument("--model", help="HF model directory or .gguf file (default: embedded model)")
    p.add_argument("--parts", default="f")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype")
    p.add_argument("--threads", type=int)
    p.add_argument("--cpu-memory", help="host RAM budget for the whole process, e.g. 1.6GB")
    p.add_argument("--device-memory", help="device memory budget (CUDA)")
    p.add_argument("--offload-dir", help="directory for the disk tier")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (default 32)")
    p.add_argument("--gen-len", type=int, default=32, help="generated tokens (default 32)")
    p.add_argument("--max-sequences", type=int, default=256,
                   help="most sequences run at once (default 256)")  # fmt: skip
    p.add_argument("--batch-size", type=int, help="keep this micro-batch size")
    p.add_argument("--num-batches", type=int, help="keep this number of micro-batches")
    p.add_argument("--compress-weight", action="store_true", help="plan with int4/int8 weights")
    p.add_argument("--allow-compression", action="store_true",
                   help="also consider int4 weights (lossy)")  # fmt: skip
    p.add_argument("--compress-bits", type=int)
    p.add_argument("--group-size", type=int)
    p.add_argument("--remeasure", action="store_true", help="measure again, ignoring the cache")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    p.set_defaults(func=cmd_plan)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layercake", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="complete one prompt, streaming tokens to the terminal")
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="apply the model's chat template")
    g.add_argument("--system", help="system message (with --chat)")
    add_verbose(g)
    add_engine_options(g)
    add_sampling_options(g)
    g.set_defaults(func=cmd_generate)
    add_dist_commands(sub)
    add_plan_command(sub)
    from layercake.bench import add_bench_command

    add_bench_command(sub, add_engine_options, add_verbose)
    b = sub.add_parser(
        "batch",
        help="answer a JSONL file of requests into a JSONL file of results (resumable)",
        description='Each input line is {"id", "prompt" | "messages"} with optional '
        'max_tokens, temperature, top_p, top_k, stop, seed, logprobs, or {"id", "prompt", '
        '"choices"} to score choices. Ids already in the output are skipped: run the same '
        "command again after a crash. The sampling options are the defaults for every line.",
    )
    b.add_argument("--input", required=True, help="JSONL requests")
    b.add_argument("--output", required=True, help="JSONL results (appended to; resumed)")
    add_verbose(b)
    add_engine_options(b)
    add_sampling_options(b, max_new_tokens=128)
    b.set_defaults(func=cmd_batch)
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (needs the serve extra)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every /v1 request")
    s.add_argument(
        "--max-body", type=int,
        help="largest request body in bytes; larger ones get 413 (default 2 MiB)",
    )  # fmt: skip
    s.add_argument(
        "--max-queue", type=int,
        help="sequences that may wait for a slot; past them requests get 429 (default 64)",
    )  # fmt: skip
    s.add_argument(
        "--max-prompts", type=int,
        help="prompts in one /v1/completions list; more is a 400 (default 16)",
    )  # fmt: skip
    add_verbose(s)
    add_engine_options(s)
    s.add_argument(
        "--no-compile", dest="compile", action="store_false",
        help="serve with eager steps: no compile at start (serve compiles its one-token step "
        "by default on CUDA where the model runs in memory in steps of <= 8 rows; on the CPU "
        "eager steps are the default, --compile asks for compiled ones)",
    )  # fmt: skip
    s.set_defaults(func=cmd_serve, compile=None)
    return parser


def add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-v", "--verbose", action="store_true",
        help="print to stderr which path runs and why, and the run's speed against this "
        "machine's measured limits (the roofline line)",
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LayercakeError as e:
        print(f"layercake: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

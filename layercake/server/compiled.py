"""Whether ``serve`` compiles its one-token step. On CUDA, in memory, it does by default: a
server runs for hours, so the tens of seconds a compile costs once buy every later step (a GPU
step of a small batch is bound by kernel launches, which a graph cuts). On the CPU it serves
eager steps by default: with the block kernels (``ops/csrc``) an eager step is faster than the
compiled one at one row and at eight (README, issue 18's figures: 70 against 58-62 tok/s for one
stream, 307-311 against 201-205 for eight), since the eager ``decode_step`` skips unwritten cache
slots while a compiled step attends over its whole static cache. Where a compiled step cannot
run (offloaded weights, compressed ones, steps of more rows than a compiled graph takes) it is
off; ``--no-compile`` turns it off, ``--compile`` asks for it anywhere it can run (a failure is
then an error, not a note).

The step is compiled before the server listens (``engine_loop.warm_up``), so the first request
never waits for it; progress lines say so while it compiles."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from layercake.errors import LayercakeError
from layercake.progress import is_quiet

if TYPE_CHECKING:
    from layercake.llm import LLM

DEFAULT_SLOTS = 8  # serve's rows decoded together without --batch-size


def serve_compiles(a: argparse.Namespace) -> bool:
    """Whether ``serve`` compiles its step without being told: in memory on CUDA, weights not
    re-compressed, steps of at most ``MAX_STATIC_BATCH`` rows (on the CPU eager steps are
    faster: see the module's doc)."""
    from layercake.runner import MAX_STATIC_BATCH

    offloaded = any(getattr(a, k, None) is not None for k in
                    ("percent", "device_memory", "cpu_memory"))  # fmt: skip
    compressed = getattr(a, "compress_weight", False) and not getattr(a, "packed", False)
    rows = a.batch_size or DEFAULT_SLOTS
    return not offloaded and not compressed and rows <= MAX_STATIC_BATCH and _device(a) == "cuda"


def _device(a: argparse.Namespace) -> str:
    return str(getattr(a, "device", "cpu") or "cpu").split(":")[0]


def step_mode(a: argparse.Namespace, default: bool) -> str:
    """What ``serve -v`` says of its steps: compiled or eager, and why (after ``warmed_up``, whose
    failed compile turns ``a.compile`` off)."""
    from layercake.runner import MAX_STATIC_BATCH

    if a.compile:
        return "compiled (" + ("the default on CUDA in memory" if default else "--compile") + ")"
    if not default:
        return "eager (--no-compile)"
    if serve_compiles(a):  # the default would compile: ``warmed_up`` fell back
        return "eager (the compile failed: see the warning above)"
    if _device(a) == "cuda":
        return ("eager (a compiled step cannot run here: offloaded, compressed or more than "
                f"{MAX_STATIC_BATCH} slots)")  # fmt: skip
    if _device(a) == "cpu":
        return "eager (the default on the CPU, faster than compiled steps here; --compile asks)"
    return f"eager (the default on {_device(a)})"


def warmed_up(
    llm: LLM, a: argparse.Namespace, slots: int, explicit: bool, reload: Callable[[], LLM]
) -> LLM:
    """``llm`` with its compiled step built for the server's engine (``slots`` rows, each cache
    size it uses); if compiling fails, an error with ``--compile`` (``explicit``), else a
    warning and the model loaded again with eager steps (``reload`` with ``a.compile`` off)."""
    from layercake.server.app import serve_context
    from layercake.server.engine_loop import warm_up

    if not is_quiet():
        print("layercake: serve compiles its one-token step before listening (once per cache "
              "size; --no-compile skips it)", file=sys.stderr, flush=True)  # fmt: skip
    try:
        warm_up(llm, slots, serve_context(llm, a.max_context))
        return llm
    except Exception as e:  # no compiler, an op Inductor cannot take: serve eagerly instead
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        if explicit:
            raise LayercakeError(f"--compile: the one-token step did not compile: {why}") from None
        print(f"layercake: warning: the one-token step did not compile ({why}); serving with "
              "eager steps", file=sys.stderr, flush=True)  # fmt: skip
    a.compile = False
    llm.close()
    return reload()

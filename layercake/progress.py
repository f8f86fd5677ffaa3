"""Progress of long waits (writing an offload layout, measuring the machine, timing layers,
building kernels, torch.compile): a tqdm bar on a terminal, plain lines on stderr otherwise
(logs, pipes, a server's output), nothing when quiet (``LAYERCAKE_QUIET=1`` or ``set_quiet``).

Three shapes of wait: ``track(items, ...)`` a loop of known length, ``waiting(what)`` one call
of unknown length, ``on_new_shape(fn, key, what)`` a function (a compiled step) that is slow
the first time it sees each shape.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

T = TypeVar("T")
LINE_EVERY_S = 5.0  # plain lines: at most one progress line this often (logs stay short)
_quiet: bool | None = None


def set_quiet(quiet: bool | None) -> None:
    """Silence progress output (``None``: back to ``$LAYERCAKE_QUIET``)."""
    global _quiet
    _quiet = quiet


def is_quiet() -> bool:
    if _quiet is not None:
        return _quiet
    return os.environ.get("LAYERCAKE_QUIET", "") not in ("", "0")


def _bar_wanted() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def _line(text: str) -> None:
    print(f"layercake: {text}", file=sys.stderr, flush=True)


def _amount(x: float, unit: str) -> str:
    if unit == "B":
        return f"{x / 1e9:.2f} GB" if x >= 1e8 else f"{x / 1e6:.1f} MB"
    return f"{x:g} {unit}".rstrip()


def track(
    items: Sequence[T],
    what: str,
    size: Callable[[T], float] | None = None,
    unit: str = "",
    every: float = LINE_EVERY_S,
) -> Iterator[T]:
    """Yield ``items``, showing ``what`` advance by ``size(item)`` (default 1) ``unit``s each
    (``unit="B"``: bytes, shown in MB/GB)."""
    if is_quiet():
        yield from items
        return
    sizes = [size(i) if size else 1 for i in items]
    total = sum(sizes)
    if _bar_wanted():
        from tqdm import tqdm

        with tqdm(total=total, desc=f"layercake: {what}", unit=unit or "it", file=sys.stderr,
                  unit_scale=unit == "B", dynamic_ncols=True) as bar:  # fmt: skip
            for item, n in zip(items, sizes):
                yield item
                bar.update(n)
        return
    start = last = time.monotonic()
    done = 0.0
    _line(f"{what}: 0/{_amount(total, unit)}")
    for item, n in zip(items, sizes):
        yield item
        done += n
        now = time.monotonic()
        if now - last >= every and done < total:
            last = now
            pct = 100 * done / total if total else 100
            _line(f"{what}: {_amount(done, unit)}/{_amount(total, unit)} ({pct:.0f} %)")
    _line(f"{what}: done, {_amount(total, unit)} in {time.monotonic() - start:.1f} s")


@contextlib.contextmanager
def waiting(what: str) -> Iterator[None]:
    """Show that ``what`` is under way for as long as the block runs, then its time."""
    if is_quiet():
        yield
        return
    start = time.monotonic()
    if not _bar_wanted():
        _line(f"{what} ...")
        try:
            yield
        except BaseException:
            _line(f"{what}: failed after {time.monotonic() - start:.1f} s")
            raise
        _line(f"{what}: done in {time.monotonic() - start:.1f} s")
        return
    from tqdm import tqdm

    bar = tqdm(total=None, desc=f"layercake: {what}", file=sys.stderr,
               bar_format="{desc}: {elapsed}")  # fmt: skip
    stop = threading.Event()

    def tick() -> None:  # nothing advances during the wait: keep the clock moving
        while not stop.wait(0.5):
            bar.refresh()

    ticker = threading.Thread(target=tick, daemon=True, name="layercake-progress")
    ticker.start()
    try:
        yield
    finally:
        stop.set()
        ticker.join()
        bar.bar_format = "{desc}: done in {elapsed}"
        bar.close()


def on_new_shape(fn: Callable[..., T], key: Callable[[tuple], Any], what: str) -> Callable[..., T]:
    """``fn`` (a compiled function) with ``waiting(what)`` around its first call for each
    ``key(args)`` (its positional arguments): ``what`` may name the key as ``{key}``."""
    seen: set[Any] = set()

    def call(*args: Any, **kw: Any) -> T:
        k = key(args)
        if k in seen:
            return fn(*args, **kw)
        with waiting(what.format(key=k)):
            out = fn(*args, **kw)
        seen.add(k)
        return out

    return call

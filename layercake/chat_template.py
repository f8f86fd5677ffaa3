"""Chat templates rendered in jinja's immutable sandbox, with a time limit and size limits.

A chat template is code that ships inside a model file. The sandbox stops it reaching Python
internals; this module also stops it running forever or filling memory, in whichever thread it
renders (the CLI's, a server worker's), by checks made as it goes:

- every ``{% for %}`` loop iterates through ``_Limits.iterate``, which counts iterations and looks
  at the clock; every call (macros, methods, globals) checks the clock too;
- every value an operator, filter, call or ``~`` makes is measured (strings by length,
  containers by what they hold, so ``[s] * n`` counts ``n`` copies of ``s``): one value may not
  exceed the output limit, and all of them together may not exceed a work budget. Operations
  whose result size is known beforehand (``'a' * 10**12``, ``10 ** 10**9``, ``x.center(10**9)``,
  ``'%999999999d'``) are refused before they run;
- the output is built piece by piece and stops at the output limit.

A failure of any kind is one ``LayercakeError`` naming the template's source.
"""

from __future__ import annotations

import functools
import json
import re
import time
from contextvars import ContextVar
from datetime import datetime
from typing import Any, ClassVar

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from layercake.errors import LayercakeError

TIME_LIMIT_S = 2.0  # a real template renders in milliseconds
MIN_OUTPUT_CHARS = 2**20  # the output limit: this plus 4x the characters of the input
WORK_FACTOR = 32  # all values made while rendering: at most this many output limits
MAX_TEMPLATE_CHARS = 2**20
MAX_INT_BITS = 2**16
MAX_JSON_INDENT = 16


class TemplateLimit(Exception):
    """Rendering went past one of the limits."""


class _Budget:
    """What one rendering may still spend: wall-clock time, value size and total work."""

    def __init__(self, max_chars: int, time_limit: float | None = None) -> None:
        time_limit = time_limit or TIME_LIMIT_S
        self.max_chars, self.time_limit = max_chars, time_limit
        self.deadline = time.monotonic() + time_limit
        self.work = WORK_FACTOR * max_chars

    def tick(self, units: int = 1) -> None:
        self.work -= units
        if self.work < 0:
            raise TemplateLimit(f"it did more than {WORK_FACTOR * self.max_chars} steps of work")
        if time.monotonic() > self.deadline:
            raise TemplateLimit(f"it ran longer than {self.time_limit:g} s")

    def allow(self, size: int, what: str = "a value") -> None:
        """Refuse to make ``what`` of ``size`` characters or items."""
        if size > self.max_chars:
            raise TemplateLimit(f"{what} of {size} characters (limit {self.max_chars})")

    def charge(self, value: Any) -> Any:
        """Count a value just made against the limits; the value itself."""
        if type(value) is int and value.bit_length() > MAX_INT_BITS:
            raise TemplateLimit(f"a number of {value.bit_length()} bits")
        size = _weight(value, self.max_chars + 1)
        self.allow(size)
        self.tick(size + 1)
        return value


_budget: ContextVar[_Budget | None] = ContextVar("layercake_template_budget", default=None)


def _current() -> _Budget:
    """The rendering's budget; at compile time (constant folding) a fresh default one."""
    return _budget.get() or _Budget(MIN_OUTPUT_CHARS)


def _weight(value: Any, stop: int) -> int:
    """Characters of a string; for containers, the weights of what they hold (shared items
    counted each time), counting stopped once past ``stop``."""
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, dict):
        value = [*value.keys(), *value.values()]
    if not isinstance(value, (list, tuple, set, frozenset)):
        return 0
    total = len(value)
    for item in value:
        if total > stop:
            break
        total += _weight(item, stop - total)
    return total


# A width or precision of 7+ digits, or one taken from the arguments, in %- or {}-formatting.
_BIG_FORMAT = re.compile(r"%[-#0 +]*(\*|\d{7})|%[-#0 +]*\d*\.(\*|\d{7})|\{[^{}]*:[^{}]*?(\d{7}|\{)")


def _check_format(fmt: Any) -> None:
    if isinstance(fmt, str) and _BIG_FORMAT.search(fmt):
        raise TemplateLimit("a format width or precision that is too large")


def _estimate(name: str, s: Any, args: tuple, kwargs: dict) -> int:
    """An upper bound on the size of ``name(s, *args, **kwargs)`` for the string operations
    that can make much more than they are given (0 for the others)."""
    a = list(args) + list(kwargs.values())
    if not isinstance(s, str):
        return 0
    if name in ("center", "ljust", "rjust", "zfill") and a and type(a[0]) is int:
        return max(len(s), a[0])
    if name == "expandtabs":
        return len(s) * max(1, a[0] if a and type(a[0]) is int else 8)
    if name == "replace" and len(a) >= 2 and isinstance(a[0], str) and isinstance(a[1], str):
        hits = s.count(a[0]) if a[0] else len(s) + 1
        return len(s) + hits * len(a[1])
    if name == "indent":
        width = a[0] if a else 4
        width = width if type(width) is int else len(str(width))
        return len(s) + (s.count("\n") + 1) * width
    if name == "wordwrap":
        wrap = kwargs.get("wrapstring", args[2] if len(args) > 2 else None)
        return len(s) * (1 + len(wrap if isinstance(wrap, str) else "\n"))
    return 0


def _check_args(b: _Budget, name: str, value: Any, args: tuple, kwargs: dict) -> None:
    """Refuse a call or filter whose result would be too large, before making it."""
    for x in (*args, *kwargs.values()):
        if type(x) is int and abs(x) > b.max_chars:
            raise TemplateLimit(f"{name}() with the argument {x}")
    if name in ("format", "format_map"):
        _check_format(value)
    b.allow(_estimate(name, value, args, kwargs), f"{name}() would make a string")


def _join_size(sep: Any, items: Any) -> int:
    if not isinstance(sep, str) or not isinstance(items, (list, tuple)):
        return 0
    return _weight(list(items), 2**62) + len(sep) * len(items)


class _Guarded:
    """An iterable that spends one unit of work per item (a ``{% for %}`` loop's)."""

    def __init__(self, iterable: Any, budget: _Budget) -> None:
        self.iterable, self.budget = iterable, budget

    def __len__(self) -> int:
        return len(self.iterable)  # TypeError when it has none, as jinja's loop expects

    def __iter__(self):
        tick = self.budget.tick
        for item in self.iterable:
            tick()
            yield item


class _Limits(jinja2.ext.Extension):
    """Hooks the rewritten template calls (reached as extension attributes, which a template
    cannot shadow with ``{% set %}``)."""

    def iterate(self, iterable: Any) -> _Guarded:
        return _Guarded(iterable, _current())

    def sized(self, value: Any) -> Any:
        return _current().charge(value)


class _AddLimits(NodeTransformer):
    """Loops iterate through ``_Limits.iterate``; ``~`` results are measured."""

    def _hook(self, name: str, node: nodes.Expr) -> nodes.Call:
        attr = nodes.ExtensionAttribute(_Limits.identifier, name, lineno=node.lineno)
        return nodes.Call(attr, [node], [], None, None, lineno=node.lineno)

    def visit_For(self, node: nodes.For) -> nodes.For:
        node = self.generic_visit(node)
        node.iter = self._hook("iterate", node.iter)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Call:
        return self._hook("sized", self.generic_visit(node))


class _LimitedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox with every operator that can grow a value, and every call, checked."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        b = _current()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if type(n) is int and isinstance(seq, (str, list, tuple)):
                    b.allow(_weight(seq, b.max_chars + 1) * n, "a repeated value")
            if type(left) is int and type(right) is int:
                if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                    raise TemplateLimit("a product too large")
        elif operator == "**" and type(left) is int and type(right) is int and right > 0:
            if max(left.bit_length(), 1) * right > MAX_INT_BITS and abs(left) > 1:
                raise TemplateLimit(f"a power too large ({left} ** {right})")
        elif operator == "%":
            _check_format(left)
        return b.charge(super().call_binop(context, operator, left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        b = _current()
        b.tick()
        owner = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
        name = getattr(__obj, "__name__", "")
        _check_args(b, name, owner, args, kwargs)
        if name == "join" and isinstance(owner, str) and args:
            args = (list(args[0]), *args[1:])  # sized, so the result can be bounded first
            b.allow(_join_size(owner, args[0]), "join() would make a string")
        return b.charge(super().call(__context, __obj, *args, **kwargs))


def _limited_filter(name: str, f: Any) -> Any:
    """``f`` with its arguments checked first and its result measured."""
    skip = 1 if hasattr(f, "jinja_pass_arg") else 0  # the context/environment argument

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        b = _current()
        b.tick()
        value, rest = (args[skip], args[skip + 1 :]) if len(args) > skip else (None, ())
        _check_args(b, name, value, rest, kwargs)
        if name == "join" and len(args) > skip and not isinstance(value, (str, list, tuple)):
            value = list(value)
            args = (*args[:skip], value, *rest)
        if name == "join":
            b.allow(_join_size(rest[0] if rest else kwargs.get("d", ""), value), "join()")
        return b.charge(f(*args, **kwargs))

    return wrapper


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (used to mark assistant tokens): render the body."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # jinja's own tojson escapes HTML characters, which templates do not expect
    if indent is not None and (type(indent) is not int or not 0 <= indent <= MAX_JSON_INDENT):
        raise TemplateLimit(f"tojson indent {indent!r} (at most {MAX_JSON_INDENT})")
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@functools.lru_cache(maxsize=1)
def _environment() -> _LimitedEnvironment:
    """The environment transformers renders chat templates in, with the limits added."""
    env = _LimitedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_Generation, _Limits, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.filters = {name: _limited_filter(name, f) for name, f in env.filters.items()}
    env.globals.pop("lipsum", None)  # lipsum(10**6): megabytes of text from one call
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@functools.lru_cache(maxsize=16)
def compile_template(template: str, source: str = "the chat template") -> jinja2.Template:
    """The template parsed, its loops and ``~`` hooked to the limits, and compiled."""
    if len(template) > MAX_TEMPLATE_CHARS:
        raise LayercakeError(f"{source}: {len(template)} characters (at most {MAX_TEMPLATE_CHARS})")
    env = _environment()
    try:
        tree = _AddLimits().visit(env.parse(template))
        return env.from_string(tree)
    except jinja2.TemplateSyntaxError as e:
        raise LayercakeError(f"{source} is not valid jinja: {e}") from None
    except (TemplateLimit, RecursionError, MemoryError, jinja2.TemplateError) as e:
        raise LayercakeError(f"{source} cannot be compiled ({type(e).__name__}: {e})") from None


def render(template: str, source: str, time_limit: float | None = None, **context: Any) -> str:
    """``template`` rendered with ``context``, within the limits (``time_limit`` seconds,
    default ``TIME_LIMIT_S``); one ``LayercakeError`` naming ``source`` for anything that goes
    wrong, the template's own ``raise_exception`` included."""
    compiled = compile_template(template, source)
    chars = MIN_OUTPUT_CHARS + 4 * _weight(list(context.values()), 2**62)
    budget = _Budget(chars, time_limit or TIME_LIMIT_S)
    token = _budget.set(budget)
    out, size = [], 0
    try:
        for piece in compiled.generate(**context):
            size += len(piece)
            budget.allow(size, "output")
            budget.tick()
            out.append(piece)
    except TemplateLimit as e:
        raise LayercakeError(f"{source} was stopped: {e}") from None
    except jinja2.TemplateError as e:
        raise LayercakeError(f"{source} failed to render: {e}") from None
    except Exception as e:  # the template is foreign code: whatever it raised is its failure
        raise LayercakeError(f"{source} failed to render ({type(e).__name__}: {e})") from None
    finally:
        _budget.reset(token)
    return "".join(out)

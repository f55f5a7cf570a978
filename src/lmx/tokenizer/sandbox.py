"""A Jinja sandbox with limits, for chat templates from model files and from requests.

Jinja's own sandbox stops templates from reaching Python internals, but not from looping for
hours (``{% for i in range(99999) %}{% for j in range(99999) %}``), from allocating hundreds of
megabytes in one expression (``{{ 'x' * 30000000 }}``), or from recursing until Python's stack
runs out. Every render here runs under a :class:`TemplateLimits`:

- **time**: a tracer (``sys.settrace``, this thread only, template frames only) checks a
  wall-clock deadline every few hundred lines of template code, so any loop, nested or not,
  and any macro recursion ends at the deadline with :class:`~lmx.errors.ChatTemplateError`;
- **size**: ``*``, ``+``, ``%``, ``**``, ``~`` (concatenation), captured blocks and macro
  output, every filter and every method call refuse or stop a result longer than
  ``max_output_chars`` (repetition, ``+``, joins and format widths are checked before
  allocating), and the rendered text itself stops at that size;
- **depth**: at most ``max_depth`` template frames (macros, recursive loops, blocks) are
  active at once, well below Python's own recursion limit.
"""

from __future__ import annotations

import math
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import wraps
from types import FrameType
from typing import Any

import jinja2
from jinja2.compiler import CodeGenerator, Frame
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmx.errors import ChatTemplateError, InvalidOptionError

DEFAULT_TIMEOUT_S = 1.0
"""Wall-clock seconds one render may take (real templates render in milliseconds)."""

DEFAULT_MAX_OUTPUT_CHARS = 1_000_000
"""The longest rendered prompt, and the longest string or list an expression may build."""

DEFAULT_MAX_DEPTH = 64
"""Template frames (macro calls, recursive loops, blocks) active at once."""

_CHECK_EVERY = 256  # line events between two clock reads: the tracer stays cheap
_TEMPLATE_FILE = "<template>"  # co_filename of code compiled by Environment.from_string
# Filters whose integer arguments are sizes (widths, counts): a huge one allocates at once.
_SIZE_FILTERS = frozenset({"center", "indent", "wordwrap", "truncate", "batch", "slice"})
_SIZE_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})
# A width in a %-format or str.format spec: '%99999999d', '{:>99999999}'.
_FORMAT_WIDTH = re.compile(r"(?:%[-+ #0]*|:[^{}]*?)(\d{7,})")
# A width taken from the arguments: '%*d', '{:>{}}'.
_FORMAT_ARG_WIDTH = re.compile(r"%[-+ #0]*\*|:[^{}]*\{")


@dataclass(frozen=True)
class TemplateLimits:
    """Limits of one chat template render.

    Attributes:
        timeout_s: wall-clock seconds the render may take (> 0).
        max_output_chars: the longest rendered text, and the longest string or sequence any
            expression may build (>= 1000).
        max_depth: template frames (macros, recursive loops) active at once (1 to 500).
    """

    timeout_s: float = DEFAULT_TIMEOUT_S
    max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS
    max_depth: int = DEFAULT_MAX_DEPTH

    def __post_init__(self) -> None:
        t = self.timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise InvalidOptionError(f"chat template timeout_s must be a number of seconds > 0, got {t!r:.40}")
        for name, lo, hi in (("max_output_chars", 1000, None), ("max_depth", 1, 500)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
                allowed = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
                raise InvalidOptionError(f"chat template {name} must be an integer {allowed}, got {value!r:.40}")


class _Budget:
    """What one render in one thread may still spend."""

    def __init__(self, limits: TemplateLimits, name: str) -> None:
        self.limits = limits
        self.name = name
        self.deadline = time.monotonic() + limits.timeout_s
        self.lines = 0
        self.depth = 0

    def fail(self, what: str) -> ChatTemplateError:
        return ChatTemplateError(f"chat template of {self.name} stopped: {what}")

    def check_size(self, size: int, what: str) -> None:
        if size > self.limits.max_output_chars:
            raise self.fail(f"{what} would be {size} long, over the limit of {self.limits.max_output_chars} characters")

    def trace(self, frame: FrameType, event: str, arg: Any) -> Callable[..., Any] | None:
        """The global tracer: follow template frames only (other code runs untraced)."""
        if event != "call" or frame.f_code.co_filename != _TEMPLATE_FILE:
            return None
        self.depth += 1
        if self.depth > self.limits.max_depth:
            self.depth -= 1  # no 'return' event comes for a frame whose 'call' raised
            raise self.fail(f"more than {self.limits.max_depth} nested template calls (macros, recursive loops)")
        return self._local

    def _local(self, frame: FrameType, event: str, arg: Any) -> Callable[..., Any] | None:
        if event == "line":
            self.lines += 1
            if self.lines % _CHECK_EVERY == 0 and time.monotonic() > self.deadline:
                raise self.fail(f"it ran longer than {self.limits.timeout_s:g} s")
        elif event == "return":
            self.depth -= 1
        return self._local


def _size(value: Any, budget: int = 10_000) -> int:
    """Characters (or items) ``value`` holds, looking into nested sequences; at most ``budget``
    containers are visited, so the estimate itself stays cheap."""
    if isinstance(value, (str, bytes)):
        return len(value)
    if not isinstance(value, (list, tuple, dict)):
        return 1
    total, stack = 0, [value]
    while stack and budget > 0:
        item = stack.pop()
        budget -= 1
        if isinstance(item, (str, bytes)):
            total += len(item)
        elif isinstance(item, (list, tuple)):
            total += len(item)
            stack.extend(item)
        elif isinstance(item, dict):
            total += len(item)
            stack.extend(item.keys())
            stack.extend(item.values())
        else:
            total += 1
    return total


class _LimitedCodeGenerator(CodeGenerator):
    """Compiles ``a ~ b`` to a size-checked join (Jinja gives no hook for concatenation)."""

    def visit_Concat(self, node: jinja2.nodes.Concat, frame: Frame) -> None:
        self.write("environment.lmx_checked(")
        super().visit_Concat(node, frame)
        self.write(")")


class LimitedEnvironment(ImmutableSandboxedEnvironment):
    """An immutable sandbox whose every render runs under a :class:`TemplateLimits`."""

    code_generator_class = _LimitedCodeGenerator
    intercepted_binops = frozenset({"*", "+", "%", "**"})

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._local = threading.local()

    def limit_filters(self) -> None:
        """Wrap every filter (call after adding custom ones) so its result is size-checked."""
        self.filters = {name: self._limit_filter(name, f) for name, f in self.filters.items()}

    # ------------------------------------------------------------------ size checks
    def _budget(self) -> _Budget | None:
        return getattr(self._local, "budget", None)

    def _check(self, size: int, what: str) -> None:
        budget = self._budget()
        if budget is None:
            # Outside render_limited: Jinja folding constants at compile time ('x'|center(10**8)).
            # Refusing makes Jinja leave the expression to run time, under the limits.
            raise ChatTemplateError(f"{what} can only be computed while rendering under limits")
        budget.check_size(size, what)

    def concat(self, pieces: Iterable[str]) -> str:  # type: ignore[override]
        """Join a captured block (``{% set x %}``, a macro's or ``caller()``'s output), refused
        past the size limit before joining: the pieces may all be one long string."""
        pieces = list(pieces)
        if self._budget() is not None:
            self._check(sum(len(p) for p in pieces), "a captured block or macro output")
        return "".join(pieces)

    def lmx_checked(self, value: Any) -> Any:
        """The value of a ``~`` concatenation, refused past the size limit."""
        self._check(_size(value), "a '~' concatenation")
        return value

    def _check_format(self, fmt: Any, args: Iterable[Any] = ()) -> None:
        if isinstance(fmt, str):
            match = _FORMAT_WIDTH.search(fmt)
            if match:
                self._check(int(match.group(1)), "a format width")
            if _FORMAT_ARG_WIDTH.search(fmt):
                for arg in _flat(args):
                    if isinstance(arg, int) and not isinstance(arg, bool):
                        self._check(abs(arg), "a format width")

    def _limit_filter(self, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        passes_context = getattr(func, "jinja_pass_arg", None) is not None

        @wraps(func)  # keeps jinja's pass_context/pass_environment marks
        def limited(*all_args: Any, **kwargs: Any) -> Any:
            args = all_args[1:] if passes_context else all_args  # the value first, then the arguments
            self._check(0, f"the {name!r} filter")  # no constant folding: see _check
            if name in _SIZE_FILTERS:
                for arg in (*args, *kwargs.values()):
                    if isinstance(arg, int) and not isinstance(arg, bool):
                        self._check(abs(arg), f"the {name!r} filter's argument")
            elif name == "format" and args:
                self._check_format(args[0], (*args[1:], *kwargs.values()))
            elif name == "replace" and len(args) >= 3:
                self._check_replace(*args[:3])
            elif name == "join":
                items = next((a for a in args if isinstance(a, (list, tuple))), None)
                if items is not None:
                    self._check(_size(items), "a joined string")
            out = func(*all_args, **kwargs)
            if isinstance(out, (str, list, tuple)):
                self._check(_size(out), f"the result of the {name!r} filter")
            return out

        return limited

    def _check_replace(self, s: Any, old: Any, new: Any) -> None:
        if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
            count = s.count(old) if old else len(s) + 1
            self._check(len(s) + count * max(len(new) - len(old), 0), "the result of replace")

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, (str, bytes, list, tuple)) and isinstance(n, int):
                self._check(_size(seq) * max(n, 0), "a repeated sequence ('*')")
            elif isinstance(left, int) and isinstance(right, int):
                digits = int((left.bit_length() + right.bit_length()) * math.log10(2)) + 1
                self._check(digits, "an integer product ('*')")
        elif operator == "+":
            if isinstance(left, (str, bytes, list, tuple)) and isinstance(right, (str, bytes, list, tuple)):
                self._check(_size(left) + _size(right), "a joined sequence ('+')")
        elif operator == "%":
            self._check_format(left, (right,))
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
            # An exact power of an int holds right * log2(left) bits: refuse a number of more
            # digits than the size limit before computing it.
            self._check(int(right * math.log10(abs(left))) + 1, "an integer power ('**')")
        return super().call_binop(context, operator, left, right)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        # Every way to reach str.format (s.format, s['format']) passes here.
        owner = getattr(value, "__self__", None)
        if isinstance(owner, str) and getattr(value, "__name__", "") in ("format", "format_map"):
            self._check_format(owner)
        return super().wrap_str_format(value)

    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        target = getattr(__obj, "__wrapped__", __obj)  # str.format comes wrapped by the sandbox
        owner = getattr(target, "__self__", None)
        method = getattr(target, "__name__", "")
        if isinstance(owner, str):
            if method in ("format", "format_map"):
                __self._check_format(owner, (*args, *kwargs.values()))
            elif method in _SIZE_METHODS:
                for arg in (*args, *kwargs.values()):
                    if isinstance(arg, int) and not isinstance(arg, bool):
                        __self._check(abs(arg), f"the argument of str.{method}")
            elif method == "replace" and len(args) >= 2:
                __self._check_replace(owner, args[0], args[1])
            elif method == "join" and args:
                __self._check(_size(args[0]) + len(owner) * _size(args[0]), "a joined string")
        out = super().call(__context, __obj, *args, **kwargs)
        if isinstance(out, (str, list, tuple)):
            __self._check(_size(out), f"the result of {method or 'a call'}")
        return out

    # ------------------------------------------------------------------ rendering
    def render_limited(
        self, template: jinja2.Template, context: dict[str, Any], limits: TemplateLimits, name: str
    ) -> str:
        """Render ``template`` under ``limits``.

        Raises:
            ChatTemplateError: a limit was reached.
            Exception: whatever the template itself raised (the caller types it).
        """
        budget = _Budget(limits, name)
        if self._budget() is not None:
            raise ChatTemplateError(f"chat template of {name} tried to render a template inside itself")
        previous = sys.gettrace()
        self._local.budget = budget
        sys.settrace(budget.trace)
        try:
            return _join_limited(template.generate(context), budget)
        finally:
            sys.settrace(previous)
            self._local.budget = None


def _flat(values: Iterable[Any]) -> Iterator[Any]:
    """The values, with those of tuples, lists and dicts (one level) spliced in."""
    for value in values:
        if isinstance(value, (tuple, list)):
            yield from value
        elif isinstance(value, dict):
            yield from value.values()
        else:
            yield value


def _join_limited(chunks: Iterator[str], budget: _Budget) -> str:
    out: list[str] = []
    size = 0
    try:
        for chunk in chunks:
            size += len(chunk)
            budget.check_size(size, "the rendered prompt")
            out.append(chunk)
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    return "".join(out)


__all__ = [
    "DEFAULT_MAX_DEPTH",
    "DEFAULT_MAX_OUTPUT_CHARS",
    "DEFAULT_TIMEOUT_S",
    "LimitedEnvironment",
    "TemplateLimits",
]

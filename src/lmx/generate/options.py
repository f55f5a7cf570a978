"""Generation options: one frozen, validated record of how to sample and when to stop.

Every value is type- and range-checked when a :class:`GenerationOptions` is built (directly,
with :func:`dataclasses.replace`, or with :meth:`GenerationOptions.from_kwargs`), so a bad
value fails at the call that passed it, with a message naming the option and what it allows.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import re
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from lmx.errors import InvalidOptionError
from lmx.generate.constraints import Constraint

MAX_LOGPROBS = 20
"""The most top alternatives ``logprobs`` may ask for (OpenAI's limit)."""

MAX_LOGIT_BIAS = 100
"""``logit_bias`` values lie in ``[-MAX_LOGIT_BIAS, MAX_LOGIT_BIAS]`` (OpenAI's range)."""

MAX_STOPS = 4096
"""The most entries (stop strings and stop token ids together) ``stop`` may hold."""

MAX_STOP_CHARS = 262_144
"""The most characters all stop strings of one request may hold together."""

MAX_DRAFT_TOKENS = 32
"""The most tokens ``num_draft_tokens`` may draft per verify pass."""

MAX_NGRAM = 16
"""The longest n-gram ``prompt_lookup_ngram`` may ask to match."""

SPECULATIVE_MODES = ("prompt-lookup", "draft-model")
"""Values of the ``speculative`` option (besides None: plain decoding)."""

_MAX_SEED = 2**64 - 1  # MLX random keys are built from a uint64 seed
_MAX_INT32 = 2**31 - 1  # MLX slice indices are 32-bit: a larger window fails inside MLX
_TOKEN_ID_STR = re.compile(r"[0-9]{1,20}")  # ASCII digits only: str.isdigit() accepts "²", which int() rejects
_SHOWN_DIGITS = 40  # longer integers are described by their size: Python refuses to print past 4300 digits


@dataclass(frozen=True)
class GenerationOptions:
    """How to generate: sampling, penalties, stop conditions and what to return.

    Attributes:
        max_tokens: the most tokens to generate (>= 1).
        temperature: softmax temperature (>= 0); 0 means greedy decoding.
        top_k: keep only the ``top_k`` most likely tokens (0 = off).
        top_p: nucleus sampling: keep the smallest set of tokens whose probability reaches
            ``top_p``, in (0, 1] (1 = off).
        min_p: keep tokens at least ``min_p`` times as likely as the most likely one, in
            [0, 1) (0 = off).
        repetition_penalty: HF/CTRL penalty (> 0, 1 = off) on tokens among the last
            ``repetition_context_size`` tokens, prompt included: a positive logit is divided
            by it, a negative one multiplied.
        repetition_context_size: how many trailing tokens the repetition penalty looks at
            (1 to 2**31 - 1).
        presence_penalty: OpenAI presence penalty in [-2, 2], subtracted once from the logit
            of every token that was already generated.
        frequency_penalty: OpenAI frequency penalty in [-2, 2], subtracted from a token's
            logit once per time it was already generated.
        logit_bias: token id -> bias in [-100, 100] added to its logit. Keys may be strings
            of digits (as JSON gives them); they are stored as ints in a read-only mapping.
        seed: random seed (an int >= 0) for reproducible sampling; None draws a fresh one.
        stop: stop strings and/or stop token ids. Generation ends at the first one hit; a
            stop string is not part of the returned text. At most ``MAX_STOPS`` (4096) entries
            whose strings hold at most ``MAX_STOP_CHARS`` (262,144) characters together.
        logprobs: None = off; 0..20 = return the chosen token's logprob plus this many most
            likely alternatives per step.
        adapter: the name of a loaded LoRA adapter to generate with (see
            :meth:`lmx.Engine.load_adapter`); None: the base model. Rows with different
            adapters run in the same batch.
        constraint: None, or a :class:`lmx.generate.constraints.Constraint` (a JSON schema, Lark
            grammar or regex) the output must match; see :mod:`lmx.generate.constraints`.
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_context_size: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # A mapping cannot be hashed; leaving it out of the hash keeps the options hashable.
    logit_bias: Mapping[int, float] | None = field(default=None, hash=False)
    seed: int | None = None
    stop: tuple[str | int, ...] = ()
    logprobs: int | None = None
    adapter: str | None = None
    constraint: Constraint | None = None
    speculative: str | None = None
    num_draft_tokens: int = 4
    prompt_lookup_ngram: int = 3

    def __post_init__(self) -> None:
        for name, check in _CHECKS.items():
            # Frozen: normalised values (float(1), ("x",), int keys) go in through object.__setattr__.
            object.__setattr__(self, name, check(name, getattr(self, name)))

    def validate(self, vocab_size: int | None = None) -> None:
        """Check every option again and, given the vocabulary size, the token ids they name.

        Args:
            vocab_size: the model's vocabulary size; when given, every ``logit_bias`` key and
                stop token id must be below it.

        Raises:
            InvalidOptionError: an option (or ``vocab_size``) is out of range or of the wrong type.
        """
        for name, check in _CHECKS.items():
            check(name, getattr(self, name))
        if vocab_size is None:
            return
        vocab_size = _check_int("vocab_size", vocab_size, lo=1)
        allowed = f"the vocabulary has {vocab_size} tokens (ids 0..{vocab_size - 1})"
        for tid in self.logit_bias or {}:
            if tid >= vocab_size:
                raise InvalidOptionError(f"logit_bias token id {show_int(tid)} is out of range: {allowed}")
        for stop in self.stop:
            if isinstance(stop, int) and stop >= vocab_size:
                raise InvalidOptionError(f"stop token id {show_int(stop)} is out of range: {allowed}")

    @classmethod
    def from_kwargs(cls, base: GenerationOptions | None = None, **kwargs: Any) -> GenerationOptions:
        """Build options from keyword arguments, on top of ``base`` (or the defaults).

        Values are normalised: a single stop string or id becomes a 1-tuple, a list a tuple,
        ``logit_bias`` string keys become ints, ints become floats where a float is expected.

        Args:
            base: options whose values are kept where ``kwargs`` does not override them.
            **kwargs: option names and values.

        Returns:
            The new options.

        Raises:
            InvalidOptionError: an unknown option name, or a value of the wrong type or out of range.
        """
        for name in kwargs:
            if name not in _CHECKS:
                close = nearest_name(name, _CHECKS)
                hint = f" (did you mean {close!r}?)" if close else ""
                raise InvalidOptionError(f"unknown option {name!r}{hint}; allowed: {', '.join(_CHECKS)}")
        return dataclasses.replace(base if base is not None else cls(), **kwargs)


def nearest_name(name: str, allowed: Iterable[str]) -> str | None:
    """The allowed name closest to a misspelled ``name``, if one is close (for error messages)."""
    close = difflib.get_close_matches(name, list(allowed), n=1)
    return close[0] if close else None


def show_int(value: int) -> str:
    """``repr(value)``, or "an integer of about N digits" for one too long to print usefully
    (``repr`` itself raises ``ValueError`` past Python's limit of 4300 digits)."""
    value = int(value)
    if value.bit_length() <= _SHOWN_DIGITS * 3:  # 2**120 < 10**40: always short enough
        return repr(value)
    digits = int(value.bit_length() * math.log10(2)) + 1
    return f"{'a negative' if value < 0 else 'an'} integer of about {digits} digits"


def _describe(value: object) -> str:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return f"{show_int(int(value))} ({type(value).__name__})"
    if isinstance(value, str) and len(value) > 60:
        return f"{value[:40]!r}... ({len(value)} characters, str)"
    return f"{value!r:.200} ({type(value).__name__})"


def _show(value: float) -> str:
    # "got -1", not "got -1.0", when the caller passed -1.
    if isinstance(value, int):
        return show_int(value)
    return repr(int(value)) if isinstance(value, float) and value.is_integer() and abs(value) < 2**53 else repr(value)


def _check_range(
    name: str,
    value: float,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> None:
    below = lo is not None and (value <= lo if lo_open else value < lo)
    above = hi is not None and (value >= hi if hi_open else value > hi)
    if not (below or above):
        return
    if lo is not None and hi is not None:
        allowed = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    elif lo is not None:
        allowed = f"{'>' if lo_open else '>='} {lo}"
    else:
        allowed = f"{'<' if hi_open else '<='} {hi}"
    raise InvalidOptionError(f"{name} must be {allowed}, got {_show(value)}")


def _check_int(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    # bool is an int subclass, but True as a token count is always a mistake.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidOptionError(f"{name} must be an integer, got {_describe(value)}")
    value = int(value)
    _check_range(name, value, lo, hi)
    return value


def _check_optional_int(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int | None:
    return None if value is None else _check_int(name, value, lo, hi)


def _check_float(
    name: str,
    value: Any,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidOptionError(f"{name} must be a number, got {_describe(value)}")
    try:
        value = float(value)
    except OverflowError:  # an int past float's range (10**309)
        raise InvalidOptionError(f"{name} must be a finite number, got {_describe(value)}") from None
    if not math.isfinite(value):
        raise InvalidOptionError(f"{name} must be a finite number, got {value!r}")
    _check_range(name, value, lo, hi, lo_open, hi_open)
    return value


def _check_token_id(name: str, value: Any) -> int:
    if isinstance(value, str) and _TOKEN_ID_STR.fullmatch(value):  # at most 20 digits: int() is safe
        return int(value)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0:
        return int(value)
    raise InvalidOptionError(f"{name} must be token ids (an int >= 0, or a string of one), got {_describe(value)}")


def _check_logit_bias(name: str, value: Any) -> Mapping[int, float] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InvalidOptionError(f"{name} must be a mapping of token id to bias, got {_describe(value)}")
    out: dict[int, float] = {}
    for key, bias in value.items():
        tid = _check_token_id(f"{name} keys", key)
        if tid in out:
            raise InvalidOptionError(f"{name} names token id {show_int(tid)} more than once")
        out[tid] = _check_float(f"{name}[{show_int(tid)}]", bias, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS)
    return types.MappingProxyType(out)


def _check_stop(name: str, value: Any) -> tuple[str | int, ...]:
    if isinstance(value, (str, numbers.Integral)) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, (list, tuple)):
        raise InvalidOptionError(f"{name} must be a string, a token id or a list of them, got {_describe(value)}")
    if len(value) > MAX_STOPS:
        raise InvalidOptionError(
            f"{name} has {len(value)} entries; at most {MAX_STOPS} stop strings and ids are allowed"
        )
    chars = sum(len(item) for item in value if isinstance(item, str))
    if chars > MAX_STOP_CHARS:
        raise InvalidOptionError(
            f"{name} strings hold {chars} characters; at most {MAX_STOP_CHARS} are allowed in one request"
        )
    out: list[str | int] = []
    for item in value:
        if isinstance(item, str):
            if not item:
                raise InvalidOptionError(f"{name} strings must not be empty")
            out.append(item)
        elif isinstance(item, numbers.Integral) and not isinstance(item, bool):
            out.append(_check_int(f"{name} token ids", item, lo=0))
        else:
            raise InvalidOptionError(f"{name} entries must be strings or token ids, got {_describe(item)}")
    return tuple(out)


def _check_adapter(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise InvalidOptionError(f"{name} must be the name of a loaded adapter or None, got {_describe(value)}")
    return value


def _check_constraint(name: str, value: Any) -> Constraint | None:
    if value is None or isinstance(value, Constraint):
        return value
    raise InvalidOptionError(
        f"{name} must be None or an lmx Constraint (Constraint.json(schema), Constraint.lark(text), "
        f"Constraint.regex(text)), got {_describe(value)}"
    )


def _check_speculative(name: str, value: Any) -> str | None:
    if value is None or value in SPECULATIVE_MODES:
        return value
    allowed = " or ".join(repr(m) for m in SPECULATIVE_MODES)
    raise InvalidOptionError(f"{name} must be None, {allowed}, got {_describe(value)}")


def check_token_ids(ids: Any, vocab_size: int, name: str = "prompt token ids") -> list[int]:
    """Check a list of token ids against the vocabulary.

    Args:
        ids: a sequence of ints.
        vocab_size: ids must lie in ``[0, vocab_size)``.
        name: what the ids are, for the message.

    Returns:
        The ids, as a new list of ints.

    Raises:
        InvalidOptionError: an id is not an int or lies outside the vocabulary; the message shows
            up to five of them (a huge one by its number of digits).
    """
    out = list(ids)
    wrong = [t for t in out if isinstance(t, bool) or not isinstance(t, numbers.Integral)]
    if wrong:
        raise InvalidOptionError(f"{name} must be ints, got {_describe(wrong[0])}")
    bad = [t for t in out if not 0 <= t < vocab_size]
    if bad:
        shown = ", ".join(show_int(t) for t in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise InvalidOptionError(f"{name} must be in [0, {vocab_size}), got [{shown}]{more}")
    return [int(t) for t in out]


# Read-only: one checker per field, in field order; each returns the normalised value.
_CHECKS: Mapping[str, Callable[[str, Any], Any]] = types.MappingProxyType(
    {
        "max_tokens": partial(_check_int, lo=1),
        "temperature": partial(_check_float, lo=0),
        "top_k": partial(_check_int, lo=0),
        "top_p": partial(_check_float, lo=0, hi=1, lo_open=True),
        "min_p": partial(_check_float, lo=0, hi=1, hi_open=True),
        "repetition_penalty": partial(_check_float, lo=0, lo_open=True),
        "repetition_context_size": partial(_check_int, lo=1, hi=_MAX_INT32),
        "presence_penalty": partial(_check_float, lo=-2, hi=2),
        "frequency_penalty": partial(_check_float, lo=-2, hi=2),
        "logit_bias": _check_logit_bias,
        "seed": partial(_check_optional_int, lo=0, hi=_MAX_SEED),
        "stop": _check_stop,
        "logprobs": partial(_check_optional_int, lo=0, hi=MAX_LOGPROBS),
        "adapter": _check_adapter,
        "constraint": _check_constraint,
        "speculative": _check_speculative,
        "num_draft_tokens": partial(_check_int, lo=1, hi=MAX_DRAFT_TOKENS),
        "prompt_lookup_ngram": partial(_check_int, lo=1, hi=MAX_NGRAM),
    }
)
assert tuple(_CHECKS) == tuple(f.name for f in dataclasses.fields(GenerationOptions)), "a field has no checker"

__all__ = [
    "MAX_DRAFT_TOKENS",
    "MAX_LOGIT_BIAS",
    "MAX_LOGPROBS",
    "MAX_NGRAM",
    "MAX_STOPS",
    "MAX_STOP_CHARS",
    "SPECULATIVE_MODES",
    "GenerationOptions",
    "check_token_ids",
    "show_int",
]

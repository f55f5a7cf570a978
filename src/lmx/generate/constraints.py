"""Constrained decoding: a row's next token must keep its text inside a JSON schema, a Lark
grammar or a regular expression.

A :class:`Constraint` is the request's spec (frozen and hashable, so options stay hashable).
:class:`ConstraintCompiler` turns specs into `llguidance <https://github.com/guidance-ai/llguidance>`_
grammars over the model's own vocabulary (the grammar engine llama.cpp and vLLM use); it is
held by whoever holds the model (the scheduler), compiles each distinct spec once (a small
bounded cache) and hands every constrained row its own :class:`RowMatcher`. A row's matcher
gives the allowed tokens of its next step as a boolean mask and consumes each token the row
samples; end-of-sequence is allowed exactly when the grammar accepts the text so far, and once
the grammar is complete only end-of-sequence is, so the row ends with finish reason ``stop``.

Unsupported JSON-schema keywords are errors (llguidance's ``lenient: false``), never silently
dropped: compiling raises :class:`lmx.errors.InvalidOptionError` naming the feature.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from lmx.errors import InvalidOptionError

logger = logging.getLogger(__name__)

Kind = Literal["json", "lark", "regex"]
KINDS: tuple[str, ...] = ("json", "lark", "regex")

MAX_CONSTRAINT_CHARS = 1_000_000
"""The longest schema or grammar text a request may give (characters)."""

# JSON compile options: whitespace between tokens is not free (a small model fills a flexible
# grammar with newlines), and a keyword llguidance does not implement is an error, not ignored.
_JSON_DEFAULTS = {"whitespace_flexible": False}
_JSON_OVERRIDES = {"lenient": False}


@dataclass(frozen=True)
class Constraint:
    """What a row's text must match.

    Attributes:
        kind: ``"json"`` (``source`` is a JSON schema, as compact JSON text), ``"lark"``
            (a Lark grammar, llguidance's dialect) or ``"regex"`` (the whole output matches).
        source: the schema or grammar text.

    Build one with :meth:`json`, :meth:`lark` or :meth:`regex`.
    """

    kind: Kind
    source: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidOptionError(f"constraint kind must be one of {', '.join(KINDS)}, got {self.kind!r:.40}")
        if not isinstance(self.source, str):
            raise InvalidOptionError(f"constraint source must be a str, got {type(self.source).__name__}")
        if not self.source.strip():
            raise InvalidOptionError(f"a {self.kind} constraint must not be empty")
        if len(self.source) > MAX_CONSTRAINT_CHARS:
            raise InvalidOptionError(
                f"a {self.kind} constraint holds {len(self.source)} characters; at most {MAX_CONSTRAINT_CHARS} are allowed"
            )

    @classmethod
    def json(cls, schema: dict[str, Any] | bool | None = None) -> Constraint:
        """Output is one JSON value matching ``schema`` (None: any JSON object).

        Raises:
            InvalidOptionError: ``schema`` is not a dict (or bool), or not JSON-serialisable.
        """
        if schema is None:
            schema = {"type": "object"}
        if not isinstance(schema, (dict, bool)):
            raise InvalidOptionError(f"a JSON schema must be an object (dict), got {type(schema).__name__}")
        try:
            # Key order is kept: llguidance writes properties in the order the schema lists them.
            text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise InvalidOptionError(f"the JSON schema is not JSON-serialisable: {e}") from None
        return cls("json", text)

    @classmethod
    def lark(cls, text: str) -> Constraint:
        """Output matches the Lark grammar ``text`` (start rule ``start``)."""
        return cls("lark", text)

    @classmethod
    def regex(cls, text: str) -> Constraint:
        """Output matches the regular expression ``text`` as a whole."""
        return cls("regex", text)

    def describe(self) -> str:
        """A short description for messages (the kind and the start of the source)."""
        shown = self.source if len(self.source) <= 60 else self.source[:57] + "..."
        return f"{self.kind} constraint {shown!r}"


def grammar_of(constraint: Constraint) -> str:
    """The llguidance grammar (its JSON form) of ``constraint``, not yet checked.

    Raises:
        InvalidOptionError: the JSON schema is not a JSON object.
    """
    import llguidance

    if constraint.kind == "json":
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(
                constraint.source, defaults=_JSON_DEFAULTS, overrides=_JSON_OVERRIDES
            )
        except ValueError as e:
            raise InvalidOptionError(f"invalid JSON schema: {e}") from None
    if constraint.kind == "lark":
        return llguidance.LLMatcher.grammar_from_lark(constraint.source)
    return llguidance.LLMatcher.grammar_from_regex(constraint.source)


# ---------------------------------------------------------------- the vocabulary as bytes
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character that spells each byte -> the byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def token_bytes(tokenizer: Any, n_vocab: int) -> tuple[list[bytes], list[int]]:
    """The bytes each token id stands for, and the ids of special tokens.

    Byte-level vocabularies (Qwen, GPT-2 style) spell bytes with GPT-2's alphabet; SentencePiece
    ones (Gemma) spell spaces as "▁" and have ``<0xNN>`` byte-fallback tokens standing for one
    byte each. Special tokens (turn markers, EOS...) are named ``<...>`` by llguidance and never
    match text. Ids past the tokenizer's vocabulary (a padded embedding) stand for no bytes.

    Args:
        tokenizer: an :class:`lmx.tokenizer.Tokenizer` (its ``backend``, ``special_token_ids``,
            ``byte_fallback_ids``).
        n_vocab: the model's vocabulary width (its logits).
    """
    backend = tokenizer.backend
    decoder = json.dumps(json.loads(backend.to_str()).get("decoder"), ensure_ascii=False)
    byte_level = '"ByteLevel"' in decoder
    metaspace = "\u2581" in decoder or '"Metaspace"' in decoder
    bytes_of = _byte_decoder()
    added = backend.get_added_tokens_decoder()
    specials = sorted(i for i in tokenizer.special_token_ids if i < n_vocab)
    fallback = tokenizer.byte_fallback_ids
    out: list[bytes] = []
    for i in range(n_vocab):
        text = added[i].content if i in added else backend.id_to_token(i)
        if text is None:
            out.append(b"")
        elif i in fallback:
            byte = int(text[3:5], 16)
            # 0xFF never occurs in UTF-8, and llguidance reserves it as the special-token marker
            out.append(bytes([byte]) if byte != 0xFF else b"")
        elif byte_level and all(c in bytes_of for c in text):
            out.append(bytes(bytes_of[c] for c in text))
        else:
            out.append((text.replace("\u2581", " ") if metaspace else text).encode("utf-8"))
    return out, specials


class _Wrapper:
    """What ``llguidance.LLTokenizer`` reads of a tokenizer (its ``TokenizerWrapper`` shape)."""

    def __init__(self, tokenizer: Any, n_vocab: int, eos: Sequence[int]) -> None:
        self.tokens, self.special_token_ids = token_bytes(tokenizer, n_vocab)
        self.eos_token_id = eos[0]
        self.bos_token_id = tokenizer.bos_token_id
        self.is_tokenizer_wrapper = True
        self._encode = tokenizer.backend.encode

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._encode(text, add_special_tokens=False).ids


# ---------------------------------------------------------------- compiling and matching
class ConstraintCompiler:
    """Compiles :class:`Constraint` specs for one model and makes a matcher per row.

    The llguidance tokenizer (the vocabulary's byte table) is built on first use; each distinct
    constraint is compiled once into a matcher in its start state, kept in a bounded
    least-recently-used cache, and copied for each row. Thread-safe: the server checks requests
    on its own threads while the scheduler's worker makes rows.

    Args:
        tokenizer: the model's :class:`lmx.tokenizer.Tokenizer`.
        eos: the model's end-of-sequence ids.
        n_vocab: the width of the model's logits.
        cache_size: the most compiled constraints kept.
    """

    def __init__(self, tokenizer: Any, eos: Iterable[int], n_vocab: int, cache_size: int = 32) -> None:
        self.tokenizer = tokenizer
        self.eos = tuple(sorted(eos))
        self.n_vocab = n_vocab
        self.cache_size = cache_size
        self._ll_tokenizer: Any = None
        self._executor: Any = None
        self._cache: collections.OrderedDict[Constraint, Any] = collections.OrderedDict()
        self._lock = threading.Lock()

    def ll_tokenizer(self) -> Any:
        """The ``llguidance.LLTokenizer`` of the model (built once, in about a second for 262k tokens)."""
        with self._lock:
            if self._ll_tokenizer is None:
                import llguidance

                if not self.eos:
                    raise InvalidOptionError("constrained decoding needs the model's end-of-sequence token")
                wrapper = _Wrapper(self.tokenizer, self.n_vocab, self.eos)
                self._ll_tokenizer = llguidance.LLTokenizer(wrapper, n_vocab=self.n_vocab, eos_token=list(self.eos))
            return self._ll_tokenizer

    def compile(self, constraint: Constraint) -> Any:
        """The matcher of ``constraint`` in its start state (compiled once, then from the cache).

        Raises:
            InvalidOptionError: the schema or grammar is invalid or uses an unsupported feature
                (llguidance's message names it).
        """
        if not isinstance(constraint, Constraint):
            raise InvalidOptionError(f"constraint must be an lmx Constraint, got {type(constraint).__name__}")
        with self._lock:
            if constraint in self._cache:
                self._cache.move_to_end(constraint)
                return self._cache[constraint]
        import llguidance

        tokenizer = self.ll_tokenizer()
        grammar = grammar_of(constraint)
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidOptionError(
                f"unsupported or invalid {constraint.kind} constraint: {_clean(matcher.get_error())}"
            )
        with self._lock:
            self._cache[constraint] = matcher
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return matcher

    def matcher(self, constraint: Constraint) -> RowMatcher:
        """A fresh :class:`RowMatcher` for one row (a copy of the compiled start state)."""
        return RowMatcher(self.compile(constraint).deep_copy(), self.eos, self.n_vocab, constraint, self.executor())

    def executor(self) -> Any:
        """The ``llguidance.LLExecutor`` (a thread pool) that computes several rows' masks at once."""
        with self._lock:
            if self._executor is None:
                import llguidance

                self._executor = llguidance.LLExecutor()
            return self._executor


def _clean(message: str) -> str:
    # llguidance prefixes its messages with its own layers ("Error building grammar: ...").
    return " ".join(message.split())[:2000]


class RowMatcher:
    """One row's position in its grammar.

    The scheduler samples a step's tokens lazily and queues the next step before it reads them,
    so the row's last sampled token waits in :attr:`pending` (a lazy (1,) array) until the next
    step asks for a mask: :meth:`next_mask` reads it, consumes it, then computes the mask.

    Args:
        matcher: an ``llguidance.LLMatcher`` in its start state, this row's own.
        eos: the model's end-of-sequence ids (all allowed when the grammar accepts).
        n_vocab: the width of the model's logits.
        constraint: the spec (for messages).
    """

    def __init__(
        self, matcher: Any, eos: Sequence[int], n_vocab: int, constraint: Constraint, executor: Any = None
    ) -> None:
        self.ll = matcher
        self.eos = tuple(eos)
        self.n_vocab = n_vocab
        self.constraint = constraint
        self.executor = executor
        self.pending: Any = None

    @property
    def live(self) -> bool:
        """Whether the grammar still allows more than end-of-sequence."""
        return not self.ll.is_stopped() and not self.ll.is_error()

    def consume(self, token: int) -> None:
        """Move past ``token``. An end-of-sequence id ends the grammar; a token the grammar did
        not allow (only possible after it was already complete) leaves it complete."""
        if token in self.eos:
            token = self.eos[0]
        if not self.ll.is_stopped() and not self.ll.consume_token(token):
            logger.debug("constraint rejected token %d: %s", token, self.ll.get_error())

    def sync(self) -> None:
        """Consume the pending sampled token, if any (reads it from the device: it waits for
        the step that made it)."""
        if self.pending is not None:
            token = int(self.pending.item())
            self.pending = None
            self.consume(token)

    def next_mask(self) -> np.ndarray:
        """The tokens allowed next, as a (n_vocab,) bool array (after consuming the pending token).

        When the grammar is complete, failed, or allows nothing, only end-of-sequence is allowed,
        so the row ends.
        """
        words = next_words([self])[0]
        return np.unpackbits(words.view(np.uint8), bitorder="little")[: self.n_vocab].astype(bool)

    @property
    def accepting(self) -> bool:
        """Whether the text so far is complete under the grammar (after the pending token)."""
        self.sync()
        return bool(self.ll.is_accepting())


def next_words(matchers: Sequence[RowMatcher]) -> np.ndarray:
    """The next allowed tokens of several rows, as bitmasks: (rows, ceil(n_vocab / 32)) int32,
    bit ``t % 32`` of word ``t // 32`` set when token ``t`` is allowed.

    Each row's pending token is consumed first; the masks of rows whose grammar still runs are
    computed together on the compiler's thread pool. A row whose grammar is complete, failed or
    allows nothing gets only end-of-sequence; end-of-sequence allowed means every EOS id is.
    """
    n_vocab = matchers[0].n_vocab
    words = np.zeros((len(matchers), math.ceil(n_vocab / 32)), dtype=np.int32)
    for m in matchers:
        m.sync()
    live = [(m.ll, i) for i, m in enumerate(matchers) if m.live]
    executor = matchers[0].executor
    if len(live) > 1 and executor is not None:
        executor.unsafe_compute_mask_ptr(live, words.ctypes.data, words.shape[1] * 4, len(matchers))
    else:
        for ll, i in live:
            ll.unsafe_compute_mask_ptr(words[i].ctypes.data, words.shape[1] * 4)
    bits = words.view(np.uint32)
    for i, m in enumerate(matchers):
        first = m.eos[0]
        if (bits[i, first // 32] >> np.uint32(first % 32)) & 1 or not bits[i].any():
            for e in m.eos:
                bits[i, e // 32] |= np.uint32(1 << (e % 32))
    return words


__all__ = [
    "KINDS",
    "MAX_CONSTRAINT_CHARS",
    "Constraint",
    "ConstraintCompiler",
    "RowMatcher",
    "grammar_of",
    "token_bytes",
]

"""One request's row in a batch: how its next token is chosen, and what its tokens release.

:class:`RowSampler` holds what a row's options ask of sampling (temperature and filters,
logits processors over its own history, its own random keys); :func:`sample_rows` applies
every row's sampler to one step's logits. :class:`RowOutput` turns the row's tokens into
:class:`lmx.Token` objects: streamed text, stop ids and strings, ``max_tokens``, the finish
reason. The scheduler runs every request, alone or batched, through these two, so stop
handling and detokenizing exist once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import mlx.core as mx
import numpy as np

from lmx.generate.constraints import RowMatcher, next_words
from lmx.generate.options import GenerationOptions
from lmx.generate.sampling import KeySequence, categorical, make_filter, make_logits_processors
from lmx.generate.stopping import StopStringMatcher
from lmx.results import Token, TopLogprob
from lmx.runtime.ops import MLX_OPS, Ops


class RowSampler:
    """The sampling state of one row: sampler, processors, history and random keys.

    Args:
        options: the request's options.
        prompt: every prompt token (cached prefix included): the processors' history.
        matcher: the row's grammar state when its options carry a ``constraint`` (made by the
            scheduler's :class:`lmx.generate.constraints.ConstraintCompiler`).
        ops: the model's ops (:mod:`lmx.runtime.ops`), for the nucleus filter and the draw.
    """

    def __init__(
        self,
        options: GenerationOptions,
        prompt: Sequence[int],
        matcher: RowMatcher | None = None,
        ops: Ops = MLX_OPS,
    ) -> None:
        self.matcher = matcher
        self.greedy = options.temperature == 0
        # Rows with the same sampler settings are filtered together. Unseeded ones draw together too
        # (one batched draw); a seeded row draws with its own keys (Ops.categorical_rows), so its
        # tokens do not depend on its batch.
        self.group = (options.temperature, options.top_k, options.top_p, options.min_p)
        self.filter = make_filter(options.top_k, options.top_p, options.min_p, ops)
        self.temperature = options.temperature
        self.ops = ops
        self.seeded = options.seed is not None
        self.processors = make_logits_processors(options, prompt_len=len(prompt))
        self.keys = KeySequence(options.seed)
        self.history = mx.array([list(prompt)]) if self.processors else None  # (1, T)

    def process(self, logits: mx.array) -> mx.array:
        """Apply the row's logits processors to its (1, V) logits."""
        for proc in self.processors:
            logits = proc(self.history, logits)
        return logits

    def take(self, token: mx.array) -> None:
        """Record the row's chosen (1,) token in its history."""
        if self.history is not None:
            self.history = mx.concatenate([self.history, token[:, None].astype(self.history.dtype)], axis=1)

    def process_after(self, logits: mx.array, extra: Sequence[int]) -> mx.array:
        """Apply the row's processors to (1, V) logits as if ``extra`` tokens followed its history
        (a drafted position)."""
        if not self.processors:
            return logits
        assert self.history is not None
        history = self.history
        if extra:
            history = mx.concatenate([history, mx.array([list(extra)], dtype=history.dtype)], axis=1)  # (1, T + j)
        for proc in self.processors:
            logits = proc(history, logits)
        return logits

    def process_drafts(self, logits: mx.array, drafts: Sequence[int]) -> mx.array:
        """Apply the row's processors to the (k + 1, V) logits of a speculative verify pass:
        position ``j`` sees the history plus ``drafts[:j]``, as plain decoding would have."""
        if not self.processors:
            return logits
        rows = [self.process_after(logits[j : j + 1], drafts[:j]) for j in range(logits.shape[0])]
        return mx.concatenate(rows, axis=0)

    def take_ids(self, ids: Sequence[int]) -> None:
        """Record several chosen tokens (a verify pass's accepted run) in the history."""
        if self.history is not None and ids:
            extra = mx.array([list(ids)], dtype=self.history.dtype)  # (1, n)
            self.history = mx.concatenate([self.history, extra], axis=1)


def sample_rows(logits: mx.array, rows: Sequence[RowSampler], ops: Ops) -> tuple[mx.array, mx.array]:
    """Choose every row's next token from one step's ``logits`` (B, V).

    Each row's processors see only its own slice and history. A constrained row's disallowed
    tokens get -inf after its processors (penalties, bias) and before its sampler (temperature,
    top-k/p), greedy or sampled; a batch without constrained rows pays nothing. The masks are computed
    on the CPU while the device runs the step that made ``logits``. Greedy rows share one argmax.
    Rows with the same sampler settings are filtered together; seeded ones then draw each with its own
    keys (a seeded row's tokens are those it gets alone), unseeded ones draw together (their draws are
    random either way). ``ops``: the model's ops (its log-softmax and argmax).

    Returns:
        ``(tokens (B,), logprobs (B, V))``; the log-probabilities are of the processed logits.
    """
    logits = logits.astype(mx.float32)
    constrained = [i for i, r in enumerate(rows) if r.matcher is not None]
    words = None
    if constrained:
        mx.async_eval(logits)  # the device runs the step while the CPU computes the masks
        words = next_words([rows[i].matcher for i in constrained])  # type: ignore[misc]
    processed = [i for i, r in enumerate(rows) if r.processors]
    if processed:  # one copy of the batch's logits with the processed rows written in, not one a row
        logits = _write_rows(logits, processed, mx.concatenate([rows[i].process(logits[i : i + 1]) for i in processed]))
    if words is not None:
        # Unpacked on the host (a sparse mask unpacks and selects in ~1 ms for 8 rows of 262k
        # tokens on the CPU; unpacking on the device took ~15 ms there), then one select.
        width = logits.shape[-1]
        bits = np.unpackbits(words.view(np.uint8), axis=1, count=width, bitorder="little").view(bool)
        if len(constrained) < len(rows):  # unconstrained rows keep every token
            allowed = np.ones((len(rows), width), dtype=bool)
            allowed[constrained] = bits
            bits = allowed
        logits = mx.where(mx.array(bits), logits, mx.array(-mx.inf, dtype=logits.dtype))
    logprobs = ops.log_softmax(logits)
    tokens = ops.argmax(logprobs)
    if not all(r.greedy for r in rows):
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(rows):
            if not r.greedy:
                groups.setdefault((r.seeded, r.group), []).append(i)
        for (seeded, _), members in groups.items():
            first = rows[members[0]]
            group = logprobs[members[0] : members[0] + 1] if len(members) == 1 else logprobs[_index(members)]
            kept = first.filter(group)  # the group's rows filtered together
            if seeded:  # each drawn with its own keys
                drawn = first.ops.categorical_rows(kept, first.temperature, [rows[i].keys.next() for i in members])
            else:  # one draw per row, with one key
                drawn = categorical(kept, first.temperature, first.keys.next(), first.ops)
            tokens = _write_rows(tokens, members, drawn.astype(tokens.dtype))
    for i, r in enumerate(rows):
        if r.history is not None:
            r.take(tokens[i : i + 1])
        if r.matcher is not None:
            r.matcher.pending = tokens[i : i + 1]  # consumed when the row's next mask is asked for
    return tokens, logprobs


def _index(rows: Sequence[int]) -> mx.array:
    return mx.array(rows, dtype=mx.int32)


def _write_rows(batch: mx.array, rows: Sequence[int], values: mx.array) -> mx.array:
    """``batch`` with its rows ``rows`` (ascending) replaced by ``values``: one scatter, or ``values``
    when they are all of its rows. ``batch`` itself is left as it was."""
    if len(rows) == batch.shape[0]:
        return values
    out = mx.array(batch)  # a handle of its own: item assignment rebinds it, not the caller's array
    out[_index(rows)] = values
    return out


class RowOutput:
    """Turns a row's tokens into :class:`Token` objects with the text they release.

    Args:
        detokenizer: the tokenizer's streaming detokenizer for this row.
        stops: stop strings and stop token ids.
        eos: the model's end-of-sequence ids.
        limit: the most tokens to generate (``max_tokens`` within the context).
    """

    def __init__(self, detokenizer: object, stops: Iterable[str | int], eos: Iterable[int], limit: int) -> None:
        stops = tuple(stops)
        self.detok = detokenizer
        self.matcher = StopStringMatcher(s for s in stops if isinstance(s, str))
        self.stop_ids = frozenset(eos) | {s for s in stops if isinstance(s, int)}
        self.limit = limit
        self.count = 0
        self.finish: str | None = None

    def add(self, tid: int, logprob: float, top: tuple | None) -> Token:
        """Take the row's next token; return it with the text it releases (and, on the
        row's last token, its finish reason)."""
        self.count += 1
        detok, matcher = self.detok, self.matcher
        if tid in self.stop_ids:
            text = matcher.feed(detok.finalize()) + matcher.flush()  # type: ignore[attr-defined]
            self.finish = "stop"
        else:
            text = matcher.feed(detok.add_token(tid))  # type: ignore[attr-defined]
            if matcher.stopped:
                self.finish = "stop"
            elif self.count >= self.limit:
                text += matcher.feed(detok.finalize())  # type: ignore[attr-defined]
                self.finish = "stop" if matcher.stopped else "length"
                text += matcher.flush()
        if top:  # the alternatives' text, so callers need no tokenizer to show them
            top = tuple(TopLogprob(i, lp, detok.piece(i)) for i, lp in top)  # type: ignore[attr-defined]
        return Token(tid, text, logprob, top, self.finish)  # type: ignore[arg-type]


__all__ = ["RowOutput", "RowSampler", "sample_rows"]

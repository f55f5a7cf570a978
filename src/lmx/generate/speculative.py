"""Speculative decoding: draft a few tokens cheaply, then check them all in one forward pass.

A row that speculates hands the model its pending token followed by ``k`` drafted tokens in
one pass (``k + 1`` positions, like a short prefill chunk). Under greedy decoding the model's
own choice at every position is known from that one pass, so the drafts are accepted up to
the first one the model would not have chosen, and the model's choice there comes for free:
each pass yields between 1 and ``k + 1`` tokens, exactly the tokens plain decoding yields
(up to the float rounding of a several-position pass, as for batching). The cache positions
of the rejected drafts are dropped again (:func:`lmx.models.cache.trim_caches`).

Two drafters:

- :class:`PromptLookup` (no second model): the tokens that followed the latest earlier
  occurrence of the sequence's last n tokens, prompt and output included. Strong where the
  output copies its prompt (editing, summarising, extracting, code changes).
- :class:`ModelDrafter`: a small model of the same vocabulary decodes ``k`` tokens greedily
  with caches of its own, kept in step with the row's accepted tokens.

Only greedy rows speculate (a sampled row decodes plainly: this module has no speculative
sampling rule); the scheduler decides when (see docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import mlx.core as mx
import numpy as np

from lmx.generate.row import RowSampler
from lmx.models.cache import KVCache, trim_caches
from lmx.runtime.ops import Ops


class Drafter(Protocol):
    """Proposes up to ``k`` tokens to follow ``seq`` (the row's prompt and output so far)."""

    def propose(self, seq: Sequence[int], k: int, sampler: RowSampler) -> list[int]: ...


def prompt_lookup(seq: Sequence[int] | np.ndarray, k: int, ngram: int) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier occurrence of ``seq``'s last ``ngram``
    tokens; ``[]`` when they occur nowhere earlier.

    No shorter n-gram is tried in its place: on the real Gemma 3 270M copying or editing a
    given text, drafts from 1- and 2-gram matches were mostly rejected, and a rejected draft
    costs about half a decode step (benchmarks/RESULTS.md).
    """
    arr = np.asarray(seq, dtype=np.int64)
    length = arr.shape[0]
    if length <= ngram:
        return []
    tail = arr[length - ngram :]
    # Windows starting at 0 .. length-1-ngram: each has a next token, and the tail itself is not one.
    windows = np.lib.stride_tricks.sliding_window_view(arr[: length - 1], ngram)
    hits = np.flatnonzero((windows == tail).all(axis=1))
    if not hits.size:
        return []
    start = int(hits[-1]) + ngram
    return arr[start : start + k].tolist()


class PromptLookup:
    """Drafts by :func:`prompt_lookup` with n-grams of up to ``ngram`` tokens."""

    def __init__(self, ngram: int) -> None:
        self.ngram = ngram

    def propose(self, seq: Sequence[int], k: int, sampler: RowSampler) -> list[int]:
        return prompt_lookup(seq, k, self.ngram)


class ModelDrafter:
    """Drafts with a small model: ``k`` greedy tokens from caches of its own, chosen after the
    row's logits processors (penalties, bias) where the draft's vocabulary has the model's size.

    The caches hold the keys and values of ``self.fed`` (a prefix of the row's sequence plus
    earlier drafts); each proposal first drops what no longer matches the row's sequence, feeds
    the rest of it, then decodes. Rows that start speculating late (their batch shrank to one)
    feed their whole sequence once.

    Args:
        model: the draft model (the :class:`lmx.models.base.LanguageModel` contract).
        prefill_step_size: chunk size for feeding many tokens at once.
        vocab_size: the size of the model's logits (the one drafted for).
    """

    def __init__(self, model: Any, prefill_step_size: int, vocab_size: int) -> None:
        self.model = model
        self.vocab_size = vocab_size
        self.step_size = prefill_step_size
        self.cache: list[KVCache] | None = None
        self.fed: list[int] = []

    def _sync(self, seq: Sequence[int]) -> list[int]:
        """Drop the cached positions past the common prefix of ``fed`` and ``seq``; return the
        tokens of ``seq`` still to feed."""
        n = min(len(self.fed), len(seq))
        a, b = np.asarray(self.fed[:n]), np.asarray(seq[:n])
        differ = np.flatnonzero(a != b)
        common = int(differ[0]) if differ.size else n
        common = min(common, len(seq) - 1)  # the last token is fed again for its logits
        if self.cache is None or not trim_caches(self.cache, len(self.fed) - common):
            self.cache, common = self.model.make_cache(), 0  # a window that no longer holds: start over
        self.fed = list(seq[:common])
        return list(seq[common:])

    def propose(self, seq: Sequence[int], k: int, sampler: RowSampler) -> list[int]:
        todo = self._sync(seq)
        assert self.cache is not None
        m, cache = self.model, self.cache
        while len(todo) > self.step_size:
            m.hidden(mx.array([todo[: self.step_size]]), cache)
            mx.eval([c.state for c in cache])
            self.fed += todo[: self.step_size]
            todo = todo[self.step_size :]
        logits = m.head(m.hidden(mx.array([todo]), cache)[:, -1:, :])[:, -1, :]
        self.fed += todo
        out: list[int] = []
        while True:
            if logits.shape[-1] == self.vocab_size:  # the processors index the model's vocabulary
                logits = sampler.process_after(logits.astype(mx.float32), out)
            token = int(mx.argmax(logits, axis=-1).item())
            out.append(token)
            if len(out) == k:
                return out
            logits = m.head(m.hidden(mx.array([[token]]), cache))[:, -1, :]
            self.fed.append(token)


@dataclass
class Verified:
    """What one verify pass gave a row.

    Attributes:
        tokens: the accepted drafts, then the model's own next token (at least one token).
        logprobs: (len(tokens), V) the log-probabilities each token was chosen from (processed,
            as plain decoding gives them).
        drafted: how many tokens were drafted.
    """

    tokens: list[int]
    logprobs: mx.array
    drafted: int

    @property
    def accepted(self) -> int:
        """How many drafted tokens were accepted."""
        return len(self.tokens) - 1


def verify(
    model: Any, cache: list[KVCache], pending: int, drafts: Sequence[int], sampler: RowSampler, ops: Ops
) -> Verified:
    """Run ``pending`` and ``drafts`` through ``model`` in one pass and accept the drafts
    greedy decoding would have made; the caches keep ``pending`` and the accepted drafts.

    Args:
        model: the model; ``cache`` holds one row's keys and values up to before ``pending``.
        cache: the row's caches (a batch of one, unpadded).
        pending: the row's last chosen token, not yet in the caches.
        drafts: the drafted tokens to follow it.
        sampler: the row's sampler (greedy): its processors see each position's own history,
            and it takes the accepted tokens into that history.
        ops: the model's ops (its log-softmax and argmax).

    Returns:
        The accepted tokens and their log-probabilities (:class:`Verified`).
    """
    assert sampler.greedy, "only greedy rows speculate"
    inputs = mx.array([[pending, *drafts]])  # (1, k + 1)
    logits = model.head(model.hidden(inputs, cache))[0].astype(mx.float32)  # (k + 1, V)
    logits = sampler.process_drafts(logits, drafts)
    logprobs = ops.log_softmax(logits)
    choices = ops.argmax(logprobs).tolist()
    n = 0
    while n < len(drafts) and drafts[n] == choices[n]:
        n += 1
    dropped = len(drafts) - n
    if dropped:
        trimmed = trim_caches(cache, dropped)
        assert trimmed, "a verify pass is shorter than a rotating cache's slack"
    tokens = [*drafts[:n], choices[n]]
    sampler.take_ids(tokens)
    return Verified(tokens, logprobs[: n + 1], len(drafts))


__all__ = ["Drafter", "ModelDrafter", "PromptLookup", "Verified", "prompt_lookup", "verify"]

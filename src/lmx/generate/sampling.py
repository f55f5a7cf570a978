"""Sampling: small pure filters, a sampler closed over them, logits processors, random keys.

Filters take log-probabilities of shape (B, V) and return them with the excluded entries set
to ``-inf``; they never renormalise their output, and accept unnormalised input (the output of another
filter). A sampler is ``(logprobs, key) -> tokens (B,)``; a logits processor is
``(tokens (B, T), logits (B, V)) -> logits``. Every row of a batch is handled on its own.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Mapping
from functools import partial

import mlx.core as mx

from lmx.generate.options import GenerationOptions
from lmx.runtime.ops import MLX_OPS, Ops

Filter = Callable[[mx.array], mx.array]
Sampler = Callable[[mx.array, mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]

# Cumulative sums and log-ratios in float32 are off by a few ulps: a set of tokens whose
# probabilities add up to exactly top_p (or a token at exactly min_p) must count as reaching it.
_TOLERANCE = 1e-6

# Up to this many generated tokens, presence and frequency penalties touch only their logits (G x G
# comparisons); past it, one dense count over the vocabulary (a 262k vocabulary: 1 MB a row).
_SPARSE_PENALTY_MAX = 1024


def apply_top_k(logprobs: mx.array, k: int) -> mx.array:
    """Keep the ``k`` most likely tokens of each row.

    Tokens tied with the k-th most likely one are all kept, so the result does not depend
    on sort order.

    Args:
        logprobs: (B, V) log-probabilities (possibly unnormalised).
        k: how many tokens to keep; ``k <= 0`` or ``k >= V`` keeps all.

    Returns:
        (B, V) ``logprobs`` with the other tokens set to ``-inf``.
    """
    if k <= 0 or k >= logprobs.shape[-1]:
        return logprobs
    kth = mx.min(mx.topk(logprobs, k, axis=-1), axis=-1, keepdims=True)  # (B, 1)
    return mx.where(logprobs >= kth, logprobs, -mx.inf)


def apply_top_p(logprobs: mx.array, p: float, ops: Ops = MLX_OPS) -> mx.array:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches ``p``.

    Probabilities are renormalised over the tokens still finite (as a softmax of the filtered
    logits would), so top_p after top_k works on what top_k left. The most likely token is
    always kept; tokens tied with the last one kept are all kept.

    Args:
        logprobs: (B, V) log-probabilities (possibly unnormalised).
        p: the probability mass to keep, in (0, 1]; ``p >= 1`` keeps all.
        ops: the model's ops (:mod:`lmx.runtime.ops`): MLX's sorts each row, the CPU kernels' op
            sorts only the tokens near the boundary.

    Returns:
        (B, V) ``logprobs`` with the other tokens set to ``-inf``.
    """
    if p >= 1.0:
        return logprobs
    # A token is kept while the mass of the more likely ones is below p (the tolerance: a set whose
    # float32 sum lands a hair below p still reaches it).
    return ops.top_p(logprobs, p - _TOLERANCE)


def apply_min_p(logprobs: mx.array, min_p: float) -> mx.array:
    """Keep the tokens whose probability is at least ``min_p`` times the most likely one's.

    Args:
        logprobs: (B, V) log-probabilities (possibly unnormalised).
        min_p: the ratio, in [0, 1); ``min_p <= 0`` keeps all.

    Returns:
        (B, V) ``logprobs`` with the other tokens set to ``-inf``.
    """
    if min_p <= 0.0:
        return logprobs
    threshold = mx.max(logprobs, axis=-1, keepdims=True) + math.log(min_p) - _TOLERANCE  # (B, 1)
    return mx.where(logprobs >= threshold, logprobs, -mx.inf)


def categorical(logits: mx.array, temperature: float, key: mx.array, ops: Ops = MLX_OPS) -> mx.array:
    """Draw one token per row from ``softmax(logits / temperature)``.

    Args:
        logits: (B, V) logits or log-probabilities; ``-inf`` entries are never drawn.
        temperature: > 0.
        key: the MLX random key to draw with.
        ops: the model's ops (:mod:`lmx.runtime.ops`): MLX's Gumbel draw, or the CPU kernels'
            inverted distribution (the same distribution; other tokens for a given key).

    Returns:
        (B,) token ids.
    """
    return ops.categorical(logits, temperature, key)


def make_sampler(
    temperature: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, ops: Ops = MLX_OPS
) -> Sampler:
    """Build a ``(logprobs (B, V), key) -> tokens (B,)`` sampler.

    With ``temperature == 0`` it is greedy (argmax; the key is ignored). Otherwise it applies
    top_k, top_p and min_p, in that order, to the untempered log-probabilities, then draws
    with :func:`categorical` at ``temperature``.

    Args:
        temperature: >= 0; 0 is greedy.
        top_k: see :func:`apply_top_k` (0 = off).
        top_p: see :func:`apply_top_p` (1 = off).
        min_p: see :func:`apply_min_p` (0 = off).
        ops: the model's ops, for :func:`apply_top_p` and :func:`categorical`.

    Returns:
        The sampler.

    Raises:
        InvalidOptionError: a parameter is out of range (as for :class:`GenerationOptions`).
    """
    # One place for the rules: the options record checks the values.
    GenerationOptions(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    if temperature == 0:

        def greedy(logprobs: mx.array, key: mx.array) -> mx.array:
            return mx.argmax(logprobs, axis=-1)

        return greedy

    keep = make_filter(top_k, top_p, min_p, ops)

    def sample(logprobs: mx.array, key: mx.array) -> mx.array:
        return categorical(keep(logprobs), temperature, key, ops)

    return sample


def make_filter(top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, ops: Ops = MLX_OPS) -> Filter:
    """The filters of :func:`make_sampler` as one: top_k, top_p and min_p, in that order (each off
    at its default). Every row is filtered on its own, so rows of several requests with the same
    settings can be filtered together."""
    filters: list[Filter] = []
    if top_k > 0:
        filters.append(partial(apply_top_k, k=top_k))
    if top_p < 1.0:
        filters.append(partial(apply_top_p, p=top_p, ops=ops))
    if min_p > 0.0:
        filters.append(partial(apply_min_p, min_p=min_p))

    def keep(logprobs: mx.array) -> mx.array:
        for f in filters:
            logprobs = f(logprobs)
        return logprobs

    return keep


def make_repetition_penalty(penalty: float, context_size: int) -> LogitsProcessor:
    """HF/CTRL repetition penalty over the last ``context_size`` tokens (prompt included).

    A penalised token's logit is divided by ``penalty`` when positive, multiplied when not;
    a token counts once however often it occurs.
    """

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        recent = tokens[:, -context_size:]  # (B, min(T, context_size))
        if recent.shape[1] == 0:
            return logits
        seen = mx.take_along_axis(logits, recent, axis=-1)
        penalised = mx.where(seen > 0, seen / penalty, seen * penalty)
        # Repeated ids write the same value, so duplicates in `recent` are harmless.
        return mx.put_along_axis(logits, recent, penalised, axis=-1)

    return process


def make_presence_frequency_penalty(presence: float, frequency: float, prompt_len: int) -> LogitsProcessor:
    """OpenAI presence/frequency penalties over the generated tokens (``tokens[:, prompt_len:]``).

    Subtracts ``presence`` once from every generated token's logit and ``frequency`` once
    per occurrence.
    """

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        generated = tokens[:, prompt_len:]  # (B, G)
        if generated.shape[1] == 0:
            return logits
        if generated.shape[1] <= _SPARSE_PENALTY_MAX:
            # Only the generated tokens' logits change: gather, penalise, write back (a repeated id
            # writes the same value). Each one's count comes from comparing the G ids pairwise.
            counts = (generated[:, :, None] == generated[:, None, :]).sum(axis=-1).astype(logits.dtype)  # (B, G)
            seen = mx.take_along_axis(logits, generated, axis=-1)
            return mx.put_along_axis(logits, generated, seen - frequency * counts - presence, axis=-1)
        rows = mx.arange(generated.shape[0])[:, None]  # (B, 1), broadcasts against (B, G)
        counts = mx.zeros(logits.shape, logits.dtype).at[rows, generated].add(1.0)  # (B, V), accumulates repeats
        return logits - frequency * counts - presence * (counts > 0).astype(logits.dtype)

    return process


def make_logit_bias(bias: Mapping[int, float]) -> LogitsProcessor:
    """Add ``bias[token]`` to each named token's logit, in every row."""
    ids = mx.array(list(bias), dtype=mx.int32)  # (N,), distinct: dict keys
    values = mx.array(list(bias.values()), dtype=mx.float32)  # (N,)

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        return logits.at[:, ids].add(values.astype(logits.dtype))

    return process


def make_logits_processors(options: GenerationOptions, prompt_len: int) -> list[LogitsProcessor]:
    """The ``(tokens, logits) -> logits`` processors that ``options`` asks for, in order.

    Order: repetition penalty, presence/frequency penalties, logit bias (last, so a bias of
    -100 bans a token whatever the penalties did).

    Args:
        options: the generation options.
        prompt_len: how many leading columns of ``tokens`` are the prompt (cached prefix
            included); presence and frequency penalties count only the columns after it.

    Returns:
        The processors; empty when every one is off.
    """
    processors: list[LogitsProcessor] = []
    if options.repetition_penalty != 1.0:
        processors.append(make_repetition_penalty(options.repetition_penalty, options.repetition_context_size))
    if options.presence_penalty != 0.0 or options.frequency_penalty != 0.0:
        processors.append(
            make_presence_frequency_penalty(options.presence_penalty, options.frequency_penalty, prompt_len)
        )
    if options.logit_bias:
        processors.append(make_logit_bias(options.logit_bias))
    return processors


def chosen_logprobs(logprobs: mx.array, ids: mx.array) -> mx.array:
    """Each row's log-probability of its chosen token: (B,) from ``logprobs`` (B, V) and ``ids`` (B,)."""
    return mx.take_along_axis(logprobs, ids[:, None], axis=-1)[:, 0]


def top_logprobs(logprobs: mx.array, n: int) -> tuple[mx.array, mx.array]:
    """The ``n`` most likely tokens of each row and their log-probabilities, most likely first.

    Args:
        logprobs: (B, V) log-probabilities.
        n: how many; clamped to [0, V].

    Returns:
        ``(ids, values)``, each (B, min(n, V)).
    """
    n = max(0, min(n, logprobs.shape[-1]))
    if n == 0:
        empty = mx.zeros((logprobs.shape[0], 0))
        return empty.astype(mx.uint32), empty.astype(logprobs.dtype)
    # argpartition is O(V); only the n chosen ones get sorted.
    ids = mx.argpartition(-logprobs, kth=n - 1, axis=-1)[:, :n]  # (B, n) unordered
    values = mx.take_along_axis(logprobs, ids, axis=-1)
    order = mx.argsort(-values, axis=-1)
    return mx.take_along_axis(ids, order, axis=-1), mx.take_along_axis(values, order, axis=-1)


class KeySequence:
    """Deterministic per-step MLX random keys from one seed; never touches MLX's global random state.

    Args:
        seed: an int >= 0; None draws one from the OS's entropy (kept in :attr:`seed`, so a
            run can be reproduced).
    """

    def __init__(self, seed: int | None = None) -> None:
        if seed is None:
            seed = secrets.randbits(63)
        checked = GenerationOptions(seed=seed).seed  # the same rules as the option
        assert checked is not None
        self.seed: int = checked
        self._key = mx.random.key(self.seed)

    def next(self) -> mx.array:
        """Split off and return the next key."""
        self._key, key = mx.random.split(self._key)
        return key


__all__ = [
    "Filter",
    "KeySequence",
    "LogitsProcessor",
    "Sampler",
    "apply_min_p",
    "apply_top_k",
    "apply_top_p",
    "categorical",
    "make_filter",
    "make_logit_bias",
    "make_logits_processors",
    "make_presence_frequency_penalty",
    "make_repetition_penalty",
    "make_sampler",
    "top_logprobs",
]

"""The step loop: chunked prefill, then one token per step with the next step queued early.

Everything else (text streaming, stop strings, metrics, batching, chat) wraps
:func:`generate_step`, which yields ``(tokens, logprobs)`` for a batch of rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn

from lmx.models.cache import KVCache

Processor = Callable[[mx.array, mx.array], mx.array]
Sampler = Callable[[mx.array, mx.array], mx.array]


def prefill(
    model: nn.Module,
    tokens: mx.array,
    cache: list[KVCache],
    pad: mx.array | None = None,
    step_size: int = 512,
) -> mx.array:
    """Run all of ``tokens`` (B, L) through the model; return the last position's logits (B, V).

    The prompt goes in chunks of ``step_size`` so activations stay bounded; only the last
    position goes through the LM head (the largest matmul for a 262k vocabulary).
    """
    while tokens.shape[1] > step_size:
        model.hidden(tokens[:, :step_size], cache, pad)
        mx.eval([c.state for c in cache])
        tokens = tokens[:, step_size:]
    h = model.hidden(tokens, cache, pad)
    return model.head(h[:, -1:, :])[:, 0, :]


def generate_step(
    model: nn.Module,
    prompt: mx.array,
    cache: list[KVCache],
    sampler: Sampler,
    keys: Callable[[], mx.array],
    *,
    history: mx.array | None = None,
    processors: Sequence[Processor] = (),
    pad: mx.array | None = None,
    prefill_step_size: int = 512,
) -> Iterator[tuple[mx.array, mx.array]]:
    """Yield ``(tokens (B,), logprobs (B, V))`` forever; the caller decides when to stop.

    Args:
        model: a model with ``hidden`` and ``head``.
        prompt: (B, L) ids not yet in ``cache`` (L >= 1).
        cache: the per-layer caches; they may already hold a prefix of the prompt.
        sampler: ``(logprobs, key) -> tokens``.
        keys: returns the next random key.
        history: (B, T) every token so far (cached prefix + prompt), for the processors.
        processors: ``(history, logits) -> logits`` callables.
        pad: (B,) left-padding counts for a padded batch.
        prefill_step_size: prompt chunk size.
    """
    history = prompt if history is None else history

    def sample(logits: mx.array) -> tuple[mx.array, mx.array]:
        nonlocal history
        logits = logits.astype(mx.float32)
        for proc in processors:
            logits = proc(history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        token = sampler(logprobs, keys())
        if processors:
            history = mx.concatenate([history, token[:, None].astype(history.dtype)], axis=1)
        return token, logprobs

    token, logprobs = sample(prefill(model, prompt, cache, pad, prefill_step_size))
    mx.async_eval(token, logprobs)
    while True:
        # Queue the next step before handing this one over: the device works on it
        # while the caller detokenizes and checks stop conditions.
        h = model.hidden(token[:, None], cache, pad)
        next_token, next_logprobs = sample(model.head(h)[:, -1, :])
        mx.async_eval(next_token, next_logprobs)
        yield token, logprobs
        token, logprobs = next_token, next_logprobs

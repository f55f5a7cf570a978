"""Losses for training and evaluation: masked next-token cross-entropy over whole sequences."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from lmx.models.cache import KVQuant, build_mask


class SequenceCache:
    """A stand-in for a KV cache when a whole sequence runs at once (training, scoring).

    It stores nothing: keys and values pass straight through, and the mask is causal (and
    sliding for a windowed layer). Holding no state is what lets gradient checkpointing run a
    layer twice.

    With ``quant``, keys and values pass through as a quantized cache would give them back
    (quantized, then dequantized: the values attention reads from a quantized cache), so a
    score measures what a quantized KV cache costs (``lmx eval --kv-bits``).
    """

    offset = 0

    def __init__(self, window: int | None = None, quant: KVQuant | None = None) -> None:
        self.window = window
        self.quant = quant

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if self.quant is None:
            return keys, values
        g, b = self.quant.group_size, self.quant.bits
        keys = mx.dequantize(*mx.quantize(keys, group_size=g, bits=b), group_size=g, bits=b)
        values = mx.dequantize(*mx.quantize(values, group_size=g, bits=b), group_size=g, bits=b)
        return keys, values

    def make_mask(self, n_queries: int, pad: mx.array | None = None) -> mx.array | str | None:
        # "causal" where it is exact (as a KV cache says it), so attention takes the same kernels as
        # a cache's prefill of the same tokens
        if pad is None and n_queries > 1 and (self.window is None or n_queries <= self.window):
            return "causal"
        return build_mask(n_queries, n_queries, n_queries, self.window, pad)


def sequence_caches(model: Any, quant: KVQuant | None = None) -> list[SequenceCache]:
    """One :class:`SequenceCache` per layer, windowed like the model's own caches."""
    return [SequenceCache(getattr(c, "window", None), quant) for c in model.make_cache()]


def token_losses(model: Any, inputs: mx.array, targets: mx.array, quant: KVQuant | None = None) -> mx.array:
    """Per-token cross-entropy (B, L) of predicting ``targets`` from ``inputs`` (float32); with
    ``quant``, attention reads keys and values as a quantized KV cache holds them."""
    logits = model.head(model.hidden(inputs, sequence_caches(model, quant)))  # (B, L, vocab)
    return nn.losses.cross_entropy(logits.astype(mx.float32), targets, reduction="none")


def loss_sum(
    model: Any, inputs: mx.array, targets: mx.array, weights: mx.array, quant: KVQuant | None = None
) -> tuple[mx.array, mx.array]:
    """``(sum of weighted token losses, sum of weights)``.

    Sums rather than a mean so that micro-batches, accumulation steps and processes add up
    exactly to the loss of the combined batch; divide by the total weight once at the end.
    """
    losses = token_losses(model, inputs, targets, quant)
    return (losses * weights).sum(), weights.sum()


def mean_loss(model: Any, inputs: mx.array, targets: mx.array, weights: mx.array) -> mx.array:
    """The mean cross-entropy over the weighted tokens."""
    total, count = loss_sum(model, inputs, targets, weights)
    return total / mx.maximum(count, 1)

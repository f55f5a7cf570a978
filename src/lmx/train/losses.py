"""Losses for training and evaluation: masked next-token cross-entropy over whole sequences."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from lmx.models.cache import build_mask


class SequenceCache:
    """A stand-in for a KV cache when a whole sequence runs at once (training, scoring).

    It stores nothing: keys and values pass straight through, and the mask is causal (and
    sliding for a windowed layer). Holding no state is what lets gradient checkpointing run a
    layer twice.
    """

    offset = 0

    def __init__(self, window: int | None = None) -> None:
        self.window = window

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return keys, values

    def make_mask(self, n_queries: int, pad: mx.array | None = None) -> mx.array | None:
        return build_mask(n_queries, n_queries, n_queries, self.window, pad)


def sequence_caches(model: Any) -> list[SequenceCache]:
    """One :class:`SequenceCache` per layer, windowed like the model's own caches."""
    return [SequenceCache(getattr(c, "window", None)) for c in model.make_cache()]


def token_losses(model: Any, inputs: mx.array, targets: mx.array) -> mx.array:
    """Per-token cross-entropy (B, L) of predicting ``targets`` from ``inputs`` (float32)."""
    logits = model.head(model.hidden(inputs, sequence_caches(model)))  # (B, L, vocab)
    return nn.losses.cross_entropy(logits.astype(mx.float32), targets, reduction="none")


def loss_sum(model: Any, inputs: mx.array, targets: mx.array, weights: mx.array) -> tuple[mx.array, mx.array]:
    """``(sum of weighted token losses, sum of weights)``.

    Sums rather than a mean so that micro-batches, accumulation steps and processes add up
    exactly to the loss of the combined batch; divide by the total weight once at the end.
    """
    losses = token_losses(model, inputs, targets)
    return (losses * weights).sum(), weights.sum()


def mean_loss(model: Any, inputs: mx.array, targets: mx.array, weights: mx.array) -> mx.array:
    """The mean cross-entropy over the weighted tokens."""
    total, count = loss_sum(model, inputs, targets, weights)
    return total / mx.maximum(count, 1)

"""Loss and perplexity of a model (with or without an adapter) on a dataset."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from lmx.models.cache import KVQuant
from lmx.train.data import Dataset, collate, eval_batches
from lmx.train.losses import loss_sum
from lmx.train.optim import all_sum


@dataclass(frozen=True)
class EvalResult:
    """Mean token cross-entropy over the scored tokens, its perplexity, and the counts."""

    loss: float
    perplexity: float
    tokens: int
    examples: int

    def as_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens, "examples": self.examples}


def evaluate(
    model: Any,
    dataset: Dataset,
    *,
    batch_size: int = 4,
    max_batches: int = -1,
    pad_id: int = 0,
    group: mx.distributed.Group | None = None,
    kv_quant: KVQuant | None = None,
) -> EvalResult:
    """Score ``dataset`` (its target tokens) in batches; no gradients, no dropout.

    Args:
        model: an lmx model.
        dataset: the examples (see :func:`lmx.train.data.load_jsonl`).
        batch_size: examples per forward pass.
        max_batches: score only the first this many batches (-1: all).
        pad_id: the padding token id.
        group: with several processes, each scores a share of the batches and the sums are
            combined, so every process gets the same result.
        kv_quant: score with keys and values as a quantized KV cache holds them (None: float).

    Returns:
        The :class:`EvalResult`.
    """
    batches = eval_batches(dataset, batch_size)
    if max_batches >= 0:
        batches = batches[:max_batches]
    rank, world = (group.rank(), group.size()) if group is not None else (0, 1)
    was_training = getattr(model, "training", False)
    model.eval()
    total, count, examples = mx.array(0.0), mx.array(0.0), 0
    try:
        for indices in batches[rank::world]:
            batch = collate([dataset.examples[i] for i in indices], pad_id)
            s, n = loss_sum(model, batch.inputs, batch.targets, batch.weights, kv_quant)
            total, count = total + s, count + n
            mx.eval(total, count)
            examples += len(indices)
    finally:
        if was_training:
            model.train()
    sums = all_sum({"loss": total, "count": count, "examples": mx.array(float(examples))}, group)
    tokens = int(sums["count"].item())
    loss = float(sums["loss"].item()) / max(tokens, 1)
    return EvalResult(loss, math.exp(min(loss, 700.0)), tokens, int(sums["examples"].item()))

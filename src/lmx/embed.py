"""Embeddings: a text's vector is the mean of the model's final-norm hidden states over its
tokens, L2-normalised.

These are pooled states of a language model, not of a model trained for embeddings: they place
texts that share wording, language or format near each other, and are fine for deduplication,
clustering by surface features, or as features for a classifier trained on top; a base model's
pooled states are a poor measure of meaning (retrieval, semantic search), where a trained
embedding model is far better.

How a call runs: the inputs are tokenized, sorted by length and cut into batches (at most
``batch_size`` rows and ``_BATCH_POSITIONS`` rows x positions); each batch is left-padded and run
through the model in chunks of the engine's prefill step with fresh caches, padding masked out of
attention (RoPE positions start at each row's first real token) and out of the mean. Batching
therefore changes nothing but float rounding. The whole call holds the model to itself
(:meth:`lmx.Engine.run_exclusive`): running generations pause between two decode steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import mlx.core as mx
import numpy as np

from lmx.errors import ContextLengthError, InvalidOptionError
from lmx.generate.options import check_token_ids

DEFAULT_BATCH_SIZE = 16
"""Inputs per forward pass when none is given (results do not depend on it)."""

_BATCH_POSITIONS = 16384  # most rows x positions in one batch: bounds activations and keys/values

EmbedInput = str | Sequence[int]


class EmbedEngine(Protocol):
    """What :func:`embed` needs of an engine (:class:`lmx.Engine` is one)."""

    model: Any
    tokenizer: Any
    context_length: int
    prefill_step_size: int

    def run_exclusive(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` with the model to itself; return its result."""


@dataclass(frozen=True)
class Embeddings:
    """The result of :func:`embed`.

    Attributes:
        vectors: one unit-length vector (``hidden_size`` floats) per input, in order.
        token_counts: the tokens each input ran as (after truncation).
        truncated: which inputs were cut to fit the context.
    """

    vectors: list[list[float]]
    token_counts: list[int]
    truncated: list[bool]

    @property
    def prompt_tokens(self) -> int:
        """Tokens of all inputs together."""
        return sum(self.token_counts)


def encode_inputs(
    engine: EmbedEngine, inputs: Sequence[EmbedInput], *, truncate: bool = False
) -> tuple[list[list[int]], list[bool]]:
    """Token ids of every input (text, or token ids checked against the vocabulary).

    Raises:
        InvalidOptionError: an input is empty, of another type, or holds ids out of range.
        ContextLengthError: an input is longer than the context and ``truncate`` is False.
    """
    vocab = int(engine.model.args.vocab_size)
    out, cut = [], []
    for i, item in enumerate(inputs):
        if isinstance(item, str):
            ids = engine.tokenizer.encode(item) if item else []
        elif isinstance(item, Sequence) and not isinstance(item, (bytes, bytearray)):
            ids = check_token_ids(item, vocab, name=f"input[{i}] token ids")
        else:
            raise InvalidOptionError(f"input[{i}] must be a string or a list of token ids, got {type(item).__name__}")
        if not ids:
            raise InvalidOptionError(f"input[{i}] is empty: give at least one token of text")
        cut.append(len(ids) > engine.context_length)
        if cut[-1]:
            if not truncate:
                raise ContextLengthError(
                    f"input[{i}] has {len(ids)} tokens; the model's context length is {engine.context_length}"
                )
            ids = ids[: engine.context_length]
        out.append(ids)
    return out, cut


def embed(
    engine: EmbedEngine,
    inputs: EmbedInput | Sequence[EmbedInput],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    truncate: bool = False,
) -> Embeddings:
    """Embed every input: mean-pooled final-norm hidden states, L2-normalised.

    Args:
        engine: the engine whose model runs; it is held for the whole call.
        inputs: a text, or a list of texts or of token-id lists.
        batch_size: inputs per forward pass (results do not depend on it beyond float rounding).
        truncate: cut inputs longer than the context (else they are an error).

    Returns:
        :class:`Embeddings` (vectors in the order of ``inputs``).

    Raises:
        InvalidOptionError: an empty or ill-typed input, ids out of range, a bad batch size.
        ContextLengthError: an input longer than the context (without ``truncate``).
        EngineClosedError: the engine is closed.
    """
    if isinstance(inputs, str) or (
        isinstance(inputs, Sequence) and inputs and all(isinstance(t, int) and not isinstance(t, bool) for t in inputs)
    ):
        inputs = [inputs]  # type: ignore[list-item]
    if not isinstance(inputs, Sequence) or isinstance(inputs, (bytes, bytearray)):
        raise InvalidOptionError(
            f"inputs must be a text or a list of texts or token-id lists, got {type(inputs).__name__}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidOptionError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not inputs:
        return Embeddings([], [], [])
    rows, truncated = encode_inputs(engine, inputs, truncate=truncate)  # type: ignore[arg-type]

    def work() -> np.ndarray:
        model = engine.model
        pad_id = engine.tokenizer.pad_token_id or 0
        out = np.zeros((len(rows), int(model.args.hidden_size)), dtype=np.float32)
        for batch in _batches([len(r) for r in rows], batch_size):
            out[batch] = _pool(model, [rows[i] for i in batch], pad_id, engine.prefill_step_size)
        return out

    vectors = engine.run_exclusive(work)
    return Embeddings(vectors.tolist(), [len(r) for r in rows], truncated)


def _batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices of the inputs in batches of similar length (longest first)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        current = batches[-1] if batches else None
        if (
            current is not None
            and len(current) < batch_size
            and lengths[current[0]] * (len(current) + 1) <= _BATCH_POSITIONS
        ):
            current.append(i)
        else:
            batches.append([i])
    return batches


def _pool(model: Any, rows: list[list[int]], pad_id: int, step: int) -> np.ndarray:
    """Unit-length mean of the final-norm hidden states of each row (rows left-padded together)."""
    width = max(len(r) for r in rows)
    pads = [width - len(r) for r in rows]
    tokens = mx.array([[pad_id] * p + r for p, r in zip(pads, rows)])  # (B, width)
    pad = mx.array(pads, dtype=mx.int32) if any(pads) else None
    pad_col = mx.array(pads, dtype=mx.int32)[:, None]  # (B, 1)
    caches = model.make_cache()
    total = mx.zeros((len(rows), int(model.args.hidden_size)), dtype=mx.float32)
    for start in range(0, width, step):
        h = model.hidden(tokens[:, start : start + step], caches, pad).astype(mx.float32)  # (B, L, dim)
        positions = mx.arange(start, start + h.shape[1])[None, :]  # (1, L)
        real = (positions >= pad_col).astype(mx.float32)[:, :, None]  # (B, L, 1): not padding
        total = total + (h * real).sum(axis=1)
        mx.eval(total, [c.state for c in caches])
    mean = total / mx.array([len(r) for r in rows], dtype=mx.float32)[:, None]
    unit = mean / mx.maximum(mx.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)
    return np.array(unit)


__all__ = ["DEFAULT_BATCH_SIZE", "EmbedEngine", "Embeddings", "embed", "encode_inputs"]

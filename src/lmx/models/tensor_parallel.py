"""Tensor parallelism for the dense architectures (Gemma 3, Qwen 3): one model split over N ranks.

Megatron's split, on ``mlx.distributed``: each rank holds ``1/N`` of the attention heads (their
rows of ``q_proj``/``k_proj``/``v_proj``, their columns of ``o_proj``), ``1/N`` of the MLP's hidden
units (rows of ``gate_proj``/``up_proj``, columns of ``down_proj``) and ``1/N`` of the vocabulary
(rows of the embedding and of an untied LM head). The residual stream, the norms and the KV cache's
layout stay whole on every rank. A layer costs two all-reduces (after ``o_proj``, after
``down_proj``); the embedding one more, and the logits one all-gather.

Where there are fewer KV heads than ranks (Gemma 3 270M/1B have one), each rank keeps the KV head
its query heads read: it is replicated, not split.

:func:`shard_model` rebuilds the layers of a freshly built model (no weights yet) at their local
shapes and returns a :class:`ShardPlan`; the loader passes each tensor it reads through
:meth:`ShardPlan.take`, so a rank keeps only its slices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from lmx.errors import UnsupportedModelError
from lmx.models.base import Linear
from lmx.runtime.distributed import Group

# Architectures whose layers shard_model knows (dense attention + gated MLP); MoE is refused.
SHARDABLE = ("gemma3_text", "qwen3")


class ShardedToAllLinear(Linear):
    """A linear layer holding a slice of the input features: partial products, summed over the ranks.

    The bias (whole on every rank) is added once, after the sum.
    """

    def __init__(self, input_dims: int, output_dims: int, bias: bool, group: Group) -> None:
        super().__init__(input_dims, output_dims, bias)
        self.group = group

    def __call__(self, x: mx.array) -> mx.array:
        y = self.group.all_sum(x @ self._weight_t())
        return y + self["bias"] if "bias" in self else y


def _gather_vocab(part: mx.array, group: Group) -> mx.array:
    """(..., V/N) logits of each rank -> (..., V), rank 0's slice first."""
    whole = group.all_gather(mx.moveaxis(part, -1, 0))  # (V, ...)
    return mx.moveaxis(whole, 0, -1)  # (..., V)


class VocabShardedEmbedding(nn.Embedding):
    """The rows ``[start, start + rows)`` of an embedding: a token's vector comes from the rank that
    holds its row (the others add zeros); as the tied LM head, each rank's logits are gathered."""

    def __init__(self, rows: int, dims: int, start: int, group: Group) -> None:
        super().__init__(rows, dims)
        self.start, self.rows, self.group = start, rows, group

    def __call__(self, x: mx.array) -> mx.array:
        local = x - self.start
        inside = (local >= 0) & (local < self.rows)
        h = self.weight[mx.where(inside, local, 0)] * inside[..., None].astype(self.weight.dtype)
        return self.group.all_sum(h)

    def as_linear(self, x: mx.array) -> mx.array:
        return _gather_vocab(x @ self.weight.T, self.group)


class VocabShardedHead(Linear):
    """An untied LM head holding the rows of its vocabulary slice; the logits are gathered."""

    def __init__(self, input_dims: int, rows: int, group: Group) -> None:
        super().__init__(input_dims, rows, bias=False)
        self.group = group

    def __call__(self, x: mx.array) -> mx.array:
        return _gather_vocab(x @ self._weight_t(), self.group)


@dataclass
class ShardPlan:
    """Which slice of which tensor this rank keeps.

    Attributes:
        rank, size: this rank and the group's size.
        slices: parameter name (as the model names it) -> (axis, start, stop) of the full tensor.
        holds: what the rank holds, in words (for ``lmx info``).
        ranks: what each rank of the group holds, rank 0 first.
    """

    rank: int
    size: int
    slices: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    holds: dict[str, str] = field(default_factory=dict)
    ranks: list[dict[str, str]] = field(default_factory=list)  # what every rank holds

    def add(self, path: str, axis: int, start: int, stop: int, bias: bool = False) -> None:
        self.slices[f"{path}.weight"] = (axis, start, stop)
        if bias and axis == 0:
            self.slices[f"{path}.bias"] = (0, start, stop)

    def slice_of(self, name: str) -> tuple[int, int, int] | None:
        """The slice of the tensor ``name``, which may carry a checkpoint's prefix the model's names lack
        (``model.language_model.``): matched on the model's name as a dotted suffix."""
        if name in self.slices:
            return self.slices[name]
        for key, value in self.slices.items():
            short = key.removeprefix("model.")
            if name == short or name.endswith("." + short):
                return value
        return None

    def take(self, name: str, array: mx.array) -> mx.array:
        """This rank's part of the tensor ``name`` as read from a file: its own copy (no view
        pins the whole tensor), or the tensor itself where it is replicated."""
        where = self.slice_of(name)
        if where is None:
            return array
        axis, start, stop = where
        index: list[Any] = [slice(None)] * array.ndim
        index[axis] = slice(start, stop)
        return mx.contiguous(array[tuple(index)])


def _split(total: int, size: int, what: str, key: str) -> int:
    if total % size:
        raise UnsupportedModelError(
            f"tensor parallel over {size} ranks needs {key} divisible by {size}; this model's {what} is {total}"
        )
    return total // size


@dataclass(frozen=True)
class _Layout:
    """The sizes and offsets of one rank's part of a model."""

    heads: int  # query heads on this rank
    kv: int  # KV heads on this rank
    first_kv: int  # the first KV head it holds
    replicated_kv: bool  # fewer KV heads than ranks: each is held by several
    hidden: int  # MLP hidden units on this rank
    vocab: int  # vocabulary rows on this rank


def _layout(args: Any, rank: int, size: int) -> _Layout:
    if args.model_type not in SHARDABLE:
        raise UnsupportedModelError(
            f"tensor parallel runs {', '.join(SHARDABLE)} models; {args.model_type!r} is not supported "
            "(mixture-of-experts layers have no tensor-parallel split in lmx)"
        )
    heads, kv_heads = args.num_attention_heads, args.num_key_value_heads
    local_heads = _split(heads, size, "num_attention_heads", "num_attention_heads")
    if kv_heads % size == 0:
        local_kv, first_kv = kv_heads // size, rank * (kv_heads // size)
    elif size % kv_heads == 0:
        # fewer KV heads than ranks: a rank keeps the one KV head its query heads read
        local_kv, first_kv = 1, rank * kv_heads // size
    else:
        raise UnsupportedModelError(
            f"tensor parallel over {size} ranks needs num_key_value_heads ({kv_heads}) to divide or be divided by {size}"
        )
    hidden = _split(args.intermediate_size, size, "intermediate_size", "intermediate_size")
    vocab = _split(args.vocab_size, size, "vocab_size", "vocab_size")
    return _Layout(local_heads, local_kv, first_kv, kv_heads % size != 0, hidden, vocab)


def holdings(args: Any, rank: int, size: int) -> dict[str, str]:
    """What rank ``rank`` of ``size`` holds of a model with config ``args``, in words (``lmx info``).

    Raises:
        UnsupportedModelError: as :func:`shard_model`.
    """
    lay = _layout(args, rank, size)
    h0, v0 = rank * lay.hidden, rank * lay.vocab
    kv = f"KV heads {lay.first_kv}-{lay.first_kv + lay.kv - 1}" if lay.kv > 1 else f"KV head {lay.first_kv}"
    return {
        "attention": f"query heads {rank * lay.heads}-{(rank + 1) * lay.heads - 1} of {args.num_attention_heads}; "
        f"{kv} of {args.num_key_value_heads}" + (" (replicated)" if lay.replicated_kv else ""),
        "mlp": f"hidden units {h0}-{h0 + lay.hidden - 1} of {args.intermediate_size}",
        "vocabulary": f"tokens {v0}-{v0 + lay.vocab - 1} of {args.vocab_size}"
        + (" (embedding, tied LM head)" if args.tie_word_embeddings else " (embedding, LM head)"),
        "replicated": "norms" + (", KV projections" if lay.replicated_kv else ""),
    }


def shard_model(model: Any, group: Group) -> ShardPlan:
    """Rebuild ``model``'s layers at this rank's shapes (in place; before any weight is loaded).

    Args:
        model: a freshly built dense Gemma 3 or Qwen 3 ``Model``.
        group: the ranks sharing it.

    Returns:
        The plan of which slices this rank keeps, for the loader.

    Raises:
        UnsupportedModelError: an architecture without a tensor-parallel split (MoE), or sizes
            that do not divide over the ranks.
    """
    args = model.args
    size, rank = group.size, group.rank
    lay = _layout(args, rank, size)
    dim = args.hidden_size
    plan = ShardPlan(rank, size)
    paths = {id(m): p for p, m in model.named_modules()}
    q_rows, kv_rows, h0 = lay.heads, lay.kv, rank * lay.hidden
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        a, m = paths[id(attn)], paths[id(mlp)]
        hd, bias = attn.head_dim, "bias" in attn.q_proj
        attn.n_heads, attn.n_kv_heads = q_rows, kv_rows
        attn.q_proj = Linear(dim, q_rows * hd, bias=bias)
        attn.k_proj = Linear(dim, kv_rows * hd, bias=bias)
        attn.v_proj = Linear(dim, kv_rows * hd, bias=bias)
        attn.o_proj = ShardedToAllLinear(q_rows * hd, dim, bias, group)
        q0, kv0 = rank * q_rows * hd, lay.first_kv * hd
        plan.add(f"{a}.q_proj", 0, q0, q0 + q_rows * hd, bias)
        plan.add(f"{a}.k_proj", 0, kv0, kv0 + kv_rows * hd, bias)
        plan.add(f"{a}.v_proj", 0, kv0, kv0 + kv_rows * hd, bias)
        plan.add(f"{a}.o_proj", 1, q0, q0 + q_rows * hd)
        mlp.gate_proj = Linear(dim, lay.hidden, bias=False)
        mlp.up_proj = Linear(dim, lay.hidden, bias=False)
        mlp.down_proj = ShardedToAllLinear(lay.hidden, dim, False, group)
        for name in ("gate_proj", "up_proj"):
            plan.add(f"{m}.{name}", 0, h0, h0 + lay.hidden)
        plan.add(f"{m}.down_proj", 1, h0, h0 + lay.hidden)
    v0 = rank * lay.vocab
    stack = model.model
    stack.embed_tokens = VocabShardedEmbedding(lay.vocab, dim, v0, group)
    plan.add(f"{paths[id(stack)]}.embed_tokens", 0, v0, v0 + lay.vocab)
    if not args.tie_word_embeddings:
        model.lm_head = VocabShardedHead(dim, lay.vocab, group)
        plan.add("lm_head", 0, v0, v0 + lay.vocab)
    plan.holds = holdings(args, rank, size)
    plan.ranks = [holdings(args, r, size) for r in range(size)]
    return plan


__all__ = [
    "SHARDABLE",
    "ShardPlan",
    "ShardedToAllLinear",
    "VocabShardedEmbedding",
    "VocabShardedHead",
    "holdings",
    "shard_model",
]

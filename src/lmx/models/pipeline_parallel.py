"""Pipeline parallelism for the dense architectures (Gemma 3, Qwen 3): the decoder layers split by rank.

Rank ``r`` of ``N`` holds a contiguous range of decoder layers (as even as the count allows, the
first ranks taking one more), and:

* rank 0 also holds the embedding and the LM head (tied to the embedding or not: both stay on
  rank 0, so a tied 262k-row embedding is held once, not at both ends);
* the last rank also holds the final norm.

A forward pass runs rank by rank: rank 0 embeds the tokens and runs its layers, sends the residual
stream (B, L, hidden_size) to rank 1 with ``mx.distributed.send``, which runs its layers, and so
on. The last rank applies the final norm; when logits are asked for (the last position of a
prefill chunk, each decode step) it sends those positions back to rank 0 (the ring's wrap-around
neighbour), rank 0 applies the LM head and the logits go along the chain 0 -> 1 -> ... -> N-1, so
every rank holds the same logits and its scheduler samples the same tokens, as under tensor
parallel (:mod:`lmx.scheduler.sync`). (Sends, not an all-sum: on the ring over 127.0.0.1 the hop
back and 262k logits by send took 1.3 ms, by all-sum 22-24 ms.) Each rank keeps the KV caches of
its own layers only.

The schedule is the simplest one (no micro-batches): one rank computes while the others wait. It
lets a model too large for one host's memory run across hosts joined by slow links (a step moves
``B * L * hidden_size`` values per hop, and ``B * vocab`` for the logits), not faster.

A rank evaluates what it sends on before returning (``mx.eval``): a prefill chunk whose output no
one reads (only its caches are evaluated) must still reach the next rank, and the last rank's
positions must leave before it waits for the logits.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from lmx.errors import UnsupportedModelError
from lmx.models.cache import KVCache, RotatingKVCache
from lmx.runtime.distributed import Group

# Architectures whose layers split_model knows (a DecoderStack of embed_tokens, layers, norm).
SPLITTABLE = ("gemma3_text", "qwen3")

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_EMBED = re.compile(r"(?:^|\.)(?:embed_tokens|lm_head|token_embd|output)\.")
_NORM = re.compile(r"(?:^|\.)norm\.weight$")


class Absent(nn.Module):
    """A decoder layer another rank holds (no weights here)."""


def layer_range(n_layers: int, rank: int, size: int) -> tuple[int, int]:
    """The layers ``[start, stop)`` rank ``rank`` of ``size`` holds: contiguous, as even as possible."""
    base, extra = divmod(n_layers, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def holdings(args: Any, rank: int, size: int) -> dict[str, str]:
    """What rank ``rank`` of ``size`` holds of a model with config ``args``, in words (``lmx info``)."""
    start, stop = layer_range(args.num_hidden_layers, rank, size)
    out = {"layers": f"{start}-{stop - 1} of {args.num_hidden_layers}"}
    if rank == 0:
        out["embedding"] = "embedding and LM head (tied)" if args.tie_word_embeddings else "embedding, LM head"
    if rank == size - 1:
        out["final norm"] = "yes"
    return out


@dataclass
class PipelinePlan:
    """What this rank holds of a model split by layers.

    Attributes:
        rank, size: this rank and the group's size.
        start, stop: the decoder layers ``[start, stop)`` it holds.
        holds: what it holds, in words (``lmx info``).
        ranks: what every rank holds, rank 0 first.
    """

    rank: int
    size: int
    start: int
    stop: int
    holds: dict[str, str] = field(default_factory=dict)
    ranks: list[dict[str, str]] = field(default_factory=list)

    def keeps(self, name: str) -> bool:
        """Whether this rank reads the tensor ``name`` (a checkpoint's or the model's name; GGUF's
        ``token_embd``/``output`` too): its layers', the embedding and LM head on rank 0, the final
        norm on the last rank, anything else (a vision tower) everywhere."""
        layer = _LAYER.search(name)
        if layer is not None:
            return self.start <= int(layer.group(1)) < self.stop
        if _EMBED.search(name) or name.startswith(("token_embd.", "output.")):
            return self.rank == 0
        if _NORM.search(name) or name == "output_norm.weight":
            return self.rank == self.size - 1
        return True


class PipelineStage:
    """This rank's part of the forward pass (the :class:`lmx.models.base.Stage` contract)."""

    def __init__(self, plan: PipelinePlan, group: Group, dims: int, dtype: mx.Dtype) -> None:
        self.plan, self.group, self.dims, self.dtype = plan, group, dims, dtype

    @property
    def first(self) -> bool:
        return self.plan.rank == 0

    @property
    def last(self) -> bool:
        return self.plan.rank == self.plan.size - 1

    def hidden(
        self,
        model: Any,
        inputs: mx.array,
        cache: Sequence[Any],
        pad: mx.array | None,
        each_layer: Callable[[mx.array], Any] | None,
    ) -> mx.array:
        stack, rank = model.model, self.plan.rank
        if self.first:
            h = stack.embed(inputs)
        else:
            h = self.group.recv((*inputs.shape[:2], self.dims), self.dtype, rank - 1)  # (B, L, dim)
        for layer, layer_cache in zip(stack.layers[self.plan.start : self.plan.stop], cache, strict=True):
            h = layer(h, layer_cache, pad)
            if each_layer is not None:
                each_layer(h)
        if self.last:
            return stack.norm(h)
        h = self.group.send(h, rank + 1)
        self._now(h)  # now: a chunk whose output nobody reads must still reach the next rank
        return h

    def head(self, model: Any, h: mx.array, local: Callable[[mx.array], mx.array]) -> mx.array:
        size, rank = self.plan.size, self.plan.rank
        if size == 1:
            return local(h)
        shape = (*h.shape[:-1], model.args.vocab_size)  # (B, L, vocab)
        if self.first:  # the last rank's normed positions in, the logits on to rank 1
            logits = local(self.group.recv(tuple(h.shape), self.dtype, size - 1)).astype(self.dtype)
            out = self.group.send(logits, 1)
        elif self.last:  # its positions go back to rank 0 first (now: the receive below must not come first)
            self._now(self.group.send(h, 0))
            out = self.group.recv(shape, self.dtype, rank - 1)
        else:
            out = self.group.send(self.group.recv(shape, self.dtype, rank - 1), rank + 1)  # passed along the chain
        # now, too: a step queued early builds its successor's receive before this step's logits are read,
        # and the stream from the previous rank carries these logits first
        self._now(out)
        return out

    def _now(self, x: mx.array) -> None:
        try:
            mx.eval(x)
        except RuntimeError as e:
            raise self.group.lost(e) from e

    def make_cache(self, model: Any) -> list[KVCache]:
        window = model.args.sliding_window
        return [
            RotatingKVCache(window) if t == "sliding_attention" else KVCache()
            for t in model.args.layer_types[self.plan.start : self.plan.stop]
        ]


def split_model(model: Any, group: Group) -> PipelinePlan:
    """Keep only this rank's layers of a freshly built model (in place; before any weight is loaded).

    Args:
        model: a freshly built Gemma 3 or Qwen 3 ``Model`` (a ``CausalLM``).
        group: the ranks sharing it.

    Returns:
        The plan: which layers this rank holds and which tensors it reads.

    Raises:
        UnsupportedModelError: another architecture, or more ranks than layers.
    """
    args, size, rank = model.args, group.size, group.rank
    if args.model_type not in SPLITTABLE:
        raise UnsupportedModelError(
            f"pipeline parallel runs {', '.join(SPLITTABLE)} models; {args.model_type!r} is not supported"
        )
    if size > args.num_hidden_layers:
        raise UnsupportedModelError(
            f"pipeline parallel over {size} ranks needs at least {size} decoder layers; this model has "
            f"{args.num_hidden_layers}"
        )
    start, stop = layer_range(args.num_hidden_layers, rank, size)
    plan = PipelinePlan(
        rank, size, start, stop, holdings(args, rank, size), [holdings(args, r, size) for r in range(size)]
    )
    stack = model.model
    stack.layers = [layer if start <= i < stop else Absent() for i, layer in enumerate(stack.layers)]
    if rank != 0:
        del stack["embed_tokens"]
        if "lm_head" in model:
            del model["lm_head"]
    if rank != size - 1:
        del stack["norm"]
    return plan


def attach(model: Any, plan: PipelinePlan, group: Group, dtype: mx.Dtype) -> None:
    """Make ``model`` (split by :func:`split_model`, its weights loaded) run as this rank's stage."""
    model.stage = PipelineStage(plan, group, model.args.hidden_size, dtype)


__all__ = ["SPLITTABLE", "Absent", "PipelinePlan", "PipelineStage", "attach", "holdings", "layer_range", "split_model"]

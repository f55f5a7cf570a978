"""A one-token decode step as compiled segments between eager attention calls.

Each segment runs from one layer's attention output to the next layer's queries, keys and
values (the rest of the layer, its MLP, the next layer's norms, projections and RoPE); the
first starts at the token ids, the last ends at the logits. Segments are compiled with
``mx.compile``: traced once, then replayed from C++, so a step costs one Python call per
layer instead of ~35 op calls, and the residual stream is (B, dim) instead of (B, 1, dim),
which saves the two reshapes MLX puts around every product of a 3-D input. What stays eager
between the segments is what the eager step does there: the cache write and MLX's fused
attention over the cache, with no mask (a one-token query sees every cached key).

Where a decode step is bound by host-side work per op (building the graph, then encoding
each op), not by the arithmetic, fewer ops and less Python per step is the lever
(benchmarks/RESULTS.md; the profile chosen at load picks this step there). Unlike
:class:`lmx.generate.step.CompiledDecode`, no array mask is needed, so attention keeps its
fused kernel. The segments are built from the model contract
(:class:`lmx.models.base.LanguageModel`): ``embed``, ``layers`` (``begin``, ``end``,
``self_attn.attend``), ``norm`` and ``head``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from lmx.models.base import LanguageModel
from lmx.models.cache import KVCache

Segment = Callable[..., Any]


def _scan(tree: Any, arrays: list[mx.array]) -> bool:
    """Append the parameter arrays of ``tree`` (a module, dict or list) to ``arrays``, in a
    fixed order; return whether a module in it draws random numbers in its current mode
    (dropout while training: LoRA's, ``nn.Dropout``), which a trace would replay unchanged."""
    stochastic = False
    if isinstance(tree, nn.Module):
        stochastic = tree.training and (bool(tree.__dict__.get("dropout")) or isinstance(tree, nn.Dropout))
        values: Any = (v for k, v in tree.items() if not k.startswith("_"))  # as Module.parameters()
    elif isinstance(tree, dict):
        values = tree.values()
    else:
        values = tree
    for v in values:
        if isinstance(v, mx.array):
            arrays.append(v)
        elif isinstance(v, (dict, list, tuple)):
            stochastic = _scan(v, arrays) or stochastic
    return stochastic


class SegmentedDecode:
    """One decode step (batch of one-token rows) of a model, in compiled segments.

    The model's weights are constants of the traces (as graph inputs, Gemma's norms would
    recompute ``1 + weight`` in every step: see ``gemma3_text.RMSNorm``), so :meth:`prepare`
    checks before each generation that the model still holds the same arrays, and traces
    anew when it does not (``model.update``, LoRA layers swapped in or fused). Until then the
    traces keep the previous arrays alive.

    Args:
        model: the model (held weakly: the traces must not keep it alive).
    """

    def __init__(self, model: LanguageModel) -> None:
        self._model = weakref.ref(model)
        self._weights: list[mx.array] = []
        self._first: Segment | None = None
        self._middle: list[Segment] = []
        self._last: Segment | None = None

    def prepare(self) -> bool:
        """Trace anew if the model's arrays changed since the segments were built; False (and
        nothing traced) where a module draws random numbers in its current mode."""
        model = self._model()
        assert model is not None
        weights: list[mx.array] = []
        if _scan(model, weights):
            return False
        same = len(weights) == len(self._weights) and all(a is b for a, b in zip(weights, self._weights))
        if not same or self._first is None:
            self._build(model)
            self._weights = weights
        return True

    def _build(self, model: LanguageModel) -> None:
        layers = model.layers
        # Arrays the modules derive from their weights and keep (Gemma's 1 + weight, a
        # Linear's weight.T) must be evaluated before tracing: a lazy one would be part of
        # the trace, recomputed in every step.
        mx.eval(model.constants())
        ref = self._model

        def first(tokens: mx.array, offset: mx.array) -> tuple[mx.array, ...]:
            m = ref()
            assert m is not None
            h = m.embed(tokens)  # (B, dim)
            return (h, *layers[0].begin(h, offset))

        def middle(i: int) -> Segment:
            def segment(h: mx.array, out: mx.array, offset: mx.array) -> tuple[mx.array, ...]:
                h = layers[i].end(h, out)  # (B, dim)
                return (h, *layers[i + 1].begin(h, offset))

            return segment

        def last(h: mx.array, out: mx.array) -> mx.array:
            m = ref()
            assert m is not None
            return m.head(m.norm(layers[-1].end(h, out)))  # (B, V)

        self._first = mx.compile(first)
        self._middle = [mx.compile(middle(i)) for i in range(len(layers) - 1)]
        self._last = mx.compile(last)

    def __call__(self, token: mx.array, cache: list[KVCache], pad: mx.array | None = None) -> mx.array:
        """Logits (B, V) for ``token`` (B,); every cache advances by one position. ``pad``: the
        rows' left padding (a batch of rows that joined at different times)."""
        model = self._model()
        assert model is not None and self._first is not None and self._last is not None
        offset = mx.array(cache[0].offset, dtype=mx.int32)  # the RoPE position, as an array: one trace
        if pad is not None:
            offset = offset - pad.astype(mx.int32)  # (B,) each row's own position
        layers, n = model.layers, len(cache)
        with model.ops.inference():  # a decode step is never differentiated (segments trace inside)
            h, q, k, v = self._first(token, offset)
            for i, c in enumerate(cache):
                out = layers[i].self_attn.attend(q, k, v, c, pad)  # (B, n_heads, 1, head_dim)
                if i + 1 < n:
                    h, q, k, v = self._middle[i](h, out, offset)
            return self._last(h, out)

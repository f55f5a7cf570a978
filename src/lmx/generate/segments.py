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
(benchmarks/RESULTS.md; the profile chosen at load picks this step there). Attention reads
the cache as it is (no mask, no fixed storage), so it keeps its fused kernel. The segments are built from the model contract
(:class:`lmx.models.base.LanguageModel`): ``embed``, ``layers`` (``begin``, ``end``,
``self_attn.attend``), ``norm`` and ``head``.

:class:`CompiledDecode` traces the same pieces as one graph, the cache writes and attention
included: the caches' storage goes in and out whole, written at a traced index, and attention
reads the slots in use (``Ops.attention_span``; a mask where the ops have no kernel for it). Its
build is one call a step instead of one a layer; it is opt-in (``decode_mode="compiled"``): on a
GPU its cache writes copy the whole storage once the device runs behind the host, as a step this
light on the host makes it do (MLX keeps each queued op's inputs until the device has run it, so a
write cannot take over a storage that a queued attention still reads; benchmarks/RESULTS.md,
"Where a GPU decode step's host time goes" and "... why a cache write copies ...").
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from lmx.models.base import LanguageModel
from lmx.models.cache import DecodeSlot, KVCache, SlotIndex

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


class _Traced:
    """Traces of a model's decode step whose weights are constants of the traces (as graph
    inputs, Gemma's norms would recompute ``1 + weight`` in every step: see
    ``gemma3_text.RMSNorm``, and a fused product's weights would be the layers' tracers), so
    :meth:`prepare` checks before each generation that the model still holds the same arrays,
    and traces anew when it does not (``model.update``, LoRA layers swapped in or fused). Until
    then the traces keep the previous arrays alive.

    Args:
        model: the model (held weakly: the traces must not keep it alive).
    """

    def __init__(self, model: LanguageModel) -> None:
        self._model = weakref.ref(model)
        self._weights: list[mx.array] = []
        self._built = False

    def prepare(self) -> bool:
        """Trace anew if the model's arrays changed since the last trace; False (and nothing
        traced) where a module draws random numbers in its current mode."""
        model = self._model()
        assert model is not None
        weights: list[mx.array] = []
        if _scan(model, weights):
            return False
        same = len(weights) == len(self._weights) and all(a is b for a, b in zip(weights, self._weights))
        if not same or not self._built:
            # Arrays the modules derive from their weights and keep (Gemma's 1 + weight, a
            # Linear's weight.T) must be evaluated before tracing: a lazy one would be part of
            # the trace, recomputed in every step.
            mx.eval(model.constants())
            self._build(model)
            self._weights, self._built = weights, True
        return True

    def _build(self, model: LanguageModel) -> None:
        raise NotImplementedError


class SegmentedDecode(_Traced):
    """One decode step (batch of one-token rows) of a model, in compiled segments (see
    :class:`_Traced` for when they are traced).

    Args:
        model: the model (held weakly: the traces must not keep it alive).
    """

    def __init__(self, model: LanguageModel) -> None:
        super().__init__(model)
        self._first: Segment | None = None
        self._middle: list[Segment] = []
        self._last: Segment | None = None

    def _build(self, model: LanguageModel) -> None:
        layers = model.layers
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


class CompiledDecode(_Traced):
    """One decode step (all layers and the LM head) of a model as one compiled graph (see
    :class:`_Traced` for when it is traced).

    Shapes must not change between steps, so the caches take part through
    :class:`DecodeSlot`: their storage goes in and comes out whole, and the write slot and the
    position are int32 arrays. A cache's storage grows (or a sliding one moves its window to the
    front) in :meth:`KVCache.reserve`, outside the graph; a new storage size traces anew (MLX
    keeps a trace per input shape). The caches of one window move in step, so each window's
    write slot is one input (:class:`SlotIndex`), and what attention derives from it is built
    once a step, not once a layer.

    Args:
        model: the model (held weakly).
        windows: each layer's sliding window (None for global layers).
        padded: whether calls pass a ``pad`` array.
    """

    def __init__(self, model: LanguageModel, windows: tuple[int | None, ...], padded: bool) -> None:
        super().__init__(model)
        self.padded = padded
        self._windows = list(dict.fromkeys(windows))  # the distinct windows, in layer order
        self._group = [self._windows.index(w) for w in windows]  # each layer's window
        self._step: Segment | None = None

    def _build(self, model: LanguageModel) -> None:
        layers = model.layers
        ref, windows, group = self._model, self._windows, self._group

        def step(
            token: mx.array, keys: list[mx.array], values: list[mx.array], index: mx.array, position: mx.array, *pad
        ) -> tuple[mx.array, list[mx.array], list[mx.array]]:
            m = ref()
            assert m is not None
            wheres = [SlotIndex(index[i], w) for i, w in enumerate(windows)]
            slots = [DecodeSlot(k, v, wheres[g], position) for k, v, g in zip(keys, values, group)]
            rows_pad = pad[0] if pad else None
            offset = position if rows_pad is None else position - rows_pad.astype(mx.int32)  # each row's RoPE position
            h = m.embed(token)  # (B, dim)
            for layer, slot in zip(layers, slots):
                q, k, v = layer.begin(h, offset)
                h = layer.end(h, layer.self_attn.attend(q, k, v, slot, rows_pad))
            return m.head(m.norm(h)), [s.keys for s in slots], [s.values for s in slots]

        self._step = mx.compile(step)

    def __call__(self, token: mx.array, cache: list[KVCache], pad: mx.array | None = None) -> mx.array:
        """Logits (B, V) for ``token`` (B,); every cache advances by one position.

        Raises:
            RuntimeError: caches of one window that are not at the same slot (they move in step).
        """
        model = self._model()
        assert model is not None and self._step is not None
        assert (pad is not None) == self.padded
        index: list[int | None] = [None] * len(self._windows)
        for c, g in zip(cache, self._group):
            at = c.reserve(1)
            if index[g] is None:
                index[g] = at
            elif index[g] != at:
                raise RuntimeError(f"caches of window {self._windows[g]} are at slots {index[g]} and {at}")
        position = mx.array(cache[0].offset, dtype=mx.int32)
        extra = (pad,) if pad is not None else ()
        with model.ops.inference():  # a decode step is never differentiated (the trace is made inside)
            logits, keys, values = self._step(
                token,
                [c.keys for c in cache],
                [c.values for c in cache],
                mx.array(index, dtype=mx.int32),
                position,
                *extra,
            )
        for c, k, v in zip(cache, keys, values):
            c.advance(k, v, 1)
        return logits

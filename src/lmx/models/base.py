"""Pieces shared by the architectures: config parsing, norms, attention, the model contract (RoPE: :mod:`lmx.models.rope`).

The layers call one ops object (:mod:`lmx.runtime.ops`) for RMSNorm, RoPE and attention: the
model holds it in an :class:`OpsSlot` shared by all its layers, and the loader fills it once
(``model.set_ops``) with the ops of the profile chosen at load. Nothing here asks where it runs.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import types
import typing
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Protocol

import mlx.core as mx
import mlx.nn as nn

from lmx.errors import ConfigError
from lmx.models.cache import DecodeSlot, KVCache, KVQuant, RotatingKVCache, Storage, slots
from lmx.models.gguf_layers import decode_blocks, decode_rows, norm_scales
from lmx.runtime.ops import MLX_OPS, Ops

logger = logging.getLogger(__name__)

_CHECKED_TYPES = (bool, int, float, str)


@dataclasses.dataclass
class BaseModelArgs:
    """Base of every ``ModelArgs``: field names match the HF ``config.json`` keys."""

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: str = "config.json") -> BaseModelArgs:
        """Build from a config dict; unknown keys are logged, missing or mistyped ones raise.

        Raises:
            ConfigError: a required key is missing or a value has the wrong type.
        """
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for name, f in fields.items():
            if name not in config:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise ConfigError(f"{source} is missing the required key {name!r}")
                continue
            kwargs[name] = _checked(name, config[name], hints[name], source)
            _check_range(name, kwargs[name], source)
        unknown = sorted(set(config) - set(fields))
        if unknown:
            logger.debug("%s: keys not used by %s: %s", source, cls.__module__, ", ".join(unknown))
        return cls(**kwargs)


# HF size keys that must be > 0: zero or a negative value fails deep inside MLX otherwise
# (division by zero, negative shapes), far from the config key that caused it.
_POSITIVE = frozenset(
    {
        "hidden_size",
        "num_hidden_layers",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "max_position_embeddings",
        "sliding_window",
        "sliding_window_pattern",
        "rms_norm_eps",
        "query_pre_attn_scalar",
        "rope_theta",
        "rope_local_base_freq",
        "final_logit_softcapping",
        "attn_logit_softcapping",
    }
)
_MAX_INT = 2**31 - 1  # MLX array dimensions are int32
# A model is built layer by layer in Python before its weights are checked; the largest
# published models have under 200 layers, so a bigger count is a corrupt config, not a model.
MAX_LAYERS = 1024


def _check_range(name: str, value: Any, source: str) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if name in _POSITIVE and value <= 0:
        raise ConfigError(f"{source}: {name!r} must be > 0, got {value!r}")
    if isinstance(value, int) and not 0 <= value <= _MAX_INT:
        raise ConfigError(f"{source}: {name!r} must be in [0, {_MAX_INT}], got {value!r}")
    if name == "num_hidden_layers" and value > MAX_LAYERS:
        raise ConfigError(f"{source}: 'num_hidden_layers' must be at most {MAX_LAYERS}, got {value!r}")


def _checked(name: str, value: Any, hint: Any, source: str) -> Any:
    """Check a config value against its annotation (ints accepted for floats; lists and dicts by JSON type)."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return value
    containers = tuple(t for t in allowed if t in (list, dict))
    if containers:
        if not isinstance(value, containers):
            want = " or ".join("a JSON array" if t is list else "a JSON object" for t in containers)
            raise ConfigError(f"{source}: {name!r} must be {want}, got {value!r:.80}")
        return value
    scalars = [t for t in allowed if t in _CHECKED_TYPES]
    if not scalars or len(scalars) != len([t for t in allowed if t is not type(None)]):
        return value  # lists / dicts: checked where they are used
    ok = any(
        (t is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (t is int and isinstance(value, int) and not isinstance(value, bool))
        or (t in (bool, str) and isinstance(value, t))
        for t in scalars
    )
    if not ok:
        want = " or ".join(t.__name__ for t in scalars)
        raise ConfigError(f"{source}: {name!r} must be {want}, got {value!r}")
    if float in scalars and int not in scalars:
        value = float(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{source}: {name!r} must be finite, got {value!r}")
    return value


class OpsSlot:
    """The ops object (:mod:`lmx.runtime.ops`) that every layer of one model calls.

    A model makes one and hands it to each layer it builds; ``set_ops`` fills it once at load
    with the load profile's ops (MLX's own until then). A plain object, not an array or a
    module, so MLX never takes it for a parameter.
    """

    __slots__ = ("ops",)

    def __init__(self, ops: Ops = MLX_OPS) -> None:
        self.ops = ops


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` through the model's ops (:mod:`lmx.runtime.ops`)."""

    def __init__(self, dims: int, eps: float = 1e-5, ops: OpsSlot | None = None) -> None:
        super().__init__(dims, eps)
        self.ops_slot = ops or OpsSlot()

    def __call__(self, x: mx.array) -> mx.array:
        return self.ops_slot.ops.rms_norm(x, self["weight"], self.eps)

    def scale(self) -> mx.array:
        """What the normed values are multiplied by: the weight."""
        return self["weight"]


@partial(mx.compile, shapeless=True)
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """``silu(gate) * up`` as one fused kernel (Qwen 3's MLP)."""
    return nn.silu(gate) * up


class Derived:
    """An array derived from a weight (its transpose, Gemma's ``1 + weight``), kept while the
    weight is the same array and made anew when it changes (``model.update``, a weight load).

    A module holds one as a plain attribute set in ``__init__`` (not an array: MLX does not take
    it for a parameter).
    """

    __slots__ = ("_derive", "_source", "_value")

    def __init__(self, derive: Callable[[mx.array], mx.array]) -> None:
        self._derive = derive
        self._source: mx.array | None = None
        self._value: mx.array | None = None

    def of(self, weight: mx.array) -> mx.array:
        """The derived array of ``weight`` (kept from the last call when ``weight`` is the same array)."""
        if self._source is not weight:
            self._source, self._value = weight, self._derive(weight)
        return self._value  # type: ignore[return-value]

    def clear(self) -> None:
        """Forget the kept array (and the weight it was derived from, which it kept alive)."""
        self._source = self._value = None


def _transpose(weight: mx.array) -> mx.array:
    return weight.T


class Linear(nn.Linear):
    """``nn.Linear`` that keeps its weight's transpose from call to call.

    ``weight.T`` is a view (no copy) but a new graph op on every call: 7 of the ~38 ops a
    layer costs per decode step, and where a step is bound by host-side work per op, that
    counts. The view is kept once per weight array (:class:`Derived`, keyed on its identity,
    so an updated weight is picked up), as Gemma's norms keep ``1 + weight``; it shares the
    weight's memory.
    """

    def __init__(self, input_dims: int, output_dims: int, bias: bool = True) -> None:
        super().__init__(input_dims, output_dims, bias)
        self.weight_t = Derived(_transpose)

    def __call__(self, x: mx.array) -> mx.array:
        if "bias" in self:
            return mx.addmm(self["bias"], x, self._weight_t())
        return x @ self._weight_t()

    def constants(self) -> list[mx.array]:
        """Arrays derived from the weights and kept between calls (compiled steps read them)."""
        return [self._weight_t()]

    def _weight_t(self) -> mx.array:
        return self.weight_t.of(self["weight"])


class FusedProducts:
    """Products of one input by several weight matrices (a layer's query, key and value
    projections; its MLP's gate and up projections) as one product, split after.

    :meth:`of` concatenates the layers' weights into one array and gives each layer back a view
    of its rows, so the weights are held once, as before. Each layer still runs alone when
    called, so whatever reads or replaces its weights (LoRA, ``model.update``, saving) sees the
    same layer as before. The fused product runs only while the layers hold those views
    (:meth:`holds`, checked by :func:`products` at each call): a layer wrapped by LoRA or given
    new weights runs alone again.

    Where a step is bound by host work per op (a GPU decode step: benchmarks/RESULTS.md) two or
    three products become one, and one larger matrix is read instead of two or three.
    """

    __slots__ = ("_arrays", "_layers", "_parts", "_quantized", "_sizes")

    def __init__(
        self,
        layers: Sequence[nn.Module],
        whole: dict[str, mx.array],
        sizes: list[int],
        quantized: tuple[Any, ...] | None,
    ) -> None:
        self._layers = tuple(layers)
        self._parts = tuple(layer["weight"] for layer in layers)
        self._sizes = sizes
        self._quantized = quantized
        # what the product reads: the quantized arrays, or the float weight and its transpose (a view)
        self._arrays = whole if quantized else {"weight": whole["weight"], "weight_t": whole["weight"].T}
        mx.eval(self._arrays)

    @classmethod
    def of(cls, layers: Sequence[nn.Module]) -> FusedProducts | None:
        """Fuse ``layers``: lmx :class:`Linear` layers, or ``nn.QuantizedLinear`` layers of one
        layout, without biases, of one input size and dtype. None (nothing changed) otherwise."""
        first = layers[0]
        if all(type(layer) is Linear and "bias" not in layer for layer in layers):
            keys, quantized = ("weight",), None
        elif all(type(layer) is nn.QuantizedLinear and "bias" not in layer for layer in layers):
            layouts = {(layer.group_size, layer.bits, layer.mode, "biases" in layer) for layer in layers}
            if len(layouts) != 1:
                return None
            keys = ("weight", "scales", "biases") if "biases" in first else ("weight", "scales")
            quantized = (first.group_size, first.bits, first.mode)
        else:
            return None
        for key in keys:
            if len({(layer[key].dtype, layer[key].shape[1:]) for layer in layers}) != 1:
                return None
        sizes = [layer["weight"].shape[0] for layer in layers]
        whole = {}
        for key in keys:
            whole[key] = mx.concatenate([layer[key] for layer in layers], axis=0)
            mx.eval(whole[key])
            start = 0
            for layer, size in zip(layers, sizes):
                setattr(layer, key, whole[key][start : start + size])  # a view: no copy
                start += size
            mx.eval([layer[key] for layer in layers])
        for layer in layers:
            if isinstance(layer, Linear):
                layer.weight_t.clear()  # it kept the unfused weight alive
        return cls(layers, whole, sizes, quantized)

    def holds(self, layers: Sequence[nn.Module]) -> bool:
        """Whether ``layers`` are the fused ones, still holding the fused weights."""
        return all(
            layer is mine and layer["weight"] is part for layer, mine, part in zip(layers, self._layers, self._parts)
        )

    def __call__(self, x: mx.array, ops: Ops = MLX_OPS) -> list[mx.array]:
        """Each layer's output for ``x``, from one product through ``ops``."""
        w = self._arrays
        if self._quantized is None:
            y = ops.dense_product(x, w["weight"], w["weight_t"])
        else:
            group_size, bits, mode = self._quantized
            y = ops.quantized_matmul(x, w["weight"], w["scales"], w.get("biases"), group_size, bits, mode)
        return mx.split(y, list(itertools.accumulate(self._sizes[:-1])), axis=-1)


def quantized_product(ops: Ops, layer: nn.Module, x: mx.array) -> mx.array:
    """``x`` by the quantized weight of ``layer`` (an ``nn.QuantizedLinear``, or an
    ``nn.QuantizedEmbedding`` as the tied head), through ``ops.quantized_matmul``; no bias."""
    return ops.quantized_matmul(
        x, layer["weight"], layer["scales"], layer.get("biases"), layer.group_size, layer.bits, layer.mode
    )


def product(ops: Ops, layer: nn.Module, x: mx.array) -> mx.array:
    """``layer(x)``; an MLX quantized layer's product goes through ``ops.quantized_matmul``, a plain
    :class:`Linear`'s without a bias through ``ops.dense_product`` (on a CUDA GPU, lmx's kernels for a
    decode step's rows: :class:`lmx.runtime.ops.CudaOps`)."""
    if type(layer) is nn.QuantizedLinear:  # exactly: a wrapper (LoRA) runs itself
        y = quantized_product(ops, layer, x)
        return y + layer["bias"] if "bias" in layer else y
    if type(layer) is Linear and "bias" not in layer:
        return ops.dense_product(x, layer["weight"], layer.weight_t.of(layer["weight"]))
    return layer(x)


def products(owner: Any, layers: Sequence[nn.Module], x: mx.array) -> list[mx.array]:
    """Each of ``layers``' outputs for ``x``: one fused product where ``owner.fused`` (a
    :class:`FusedProducts` or None) still holds them, else each layer alone (:func:`product`, with
    ``owner.ops_slot``'s ops). A fusion whose layers are plain layers again (new weights loaded, a
    LoRA fused in) is dropped, freeing its array."""
    ops = owner.ops_slot.ops
    fused = owner.fused
    if fused is not None:
        if fused.holds(layers):
            return fused(x, ops)
        if all(isinstance(layer, (nn.Linear, nn.QuantizedLinear)) for layer in layers):  # not wrapped (LoRA)
            owner.fused = None
    return [product(ops, layer, x) for layer in layers]


class GatedMLP(nn.Module):
    """An MLP of ``gate_proj``, ``up_proj`` and ``down_proj`` (a subclass builds them and
    combines the gate and up outputs in ``__call__``, reading them from :meth:`gate_up`, and
    projects back with :meth:`down`).

    Args:
        ops: the model's :class:`OpsSlot` (its quantized products, a subclass's activation).
    """

    def __init__(self, ops: OpsSlot | None = None) -> None:
        super().__init__()
        self.ops_slot = ops or OpsSlot()
        self.fused: FusedProducts | None = None  # gate/up as one product (see fuse)

    def fuse(self) -> bool:
        """Run the gate and up projections as one product (:class:`FusedProducts`)."""
        self.fused = FusedProducts.of([self.gate_proj, self.up_proj])
        return self.fused is not None

    def gate_up(self, x: mx.array) -> list[mx.array]:
        """The gate and up projections of ``x``."""
        return products(self, (self.gate_proj, self.up_proj), x)

    def down(self, x: mx.array) -> mx.array:
        """The down projection of ``x``."""
        return product(self.ops_slot.ops, self.down_proj, x)


def rope_offset(offset: int | mx.array, pad: mx.array | None) -> int | mx.array:
    """Each row's RoPE position for the storage index ``offset``: a row left-padded by
    ``pad[b]`` index positions starts at position 0, as it would alone (rows of a batch then
    differ from running alone only by float rounding, wherever they sit in the storage)."""
    return offset if pad is None else offset - pad  # (B,) when padded


def split_heads(x: mx.array, n_heads: int, norm: nn.Module | None = None) -> mx.array:
    """(B, L, n_heads * D) -> (B, n_heads, L, D), each head normed by ``norm`` (if given).

    One position, (B, 1, n_heads * D) or (B, n_heads * D) as the segmented decode step
    passes it, is already laid out as (B, n_heads, 1, D): a reshape, no transpose op.
    """
    batch, length = x.shape[0], 1 if x.ndim == 2 else x.shape[1]
    if length == 1:
        x = x.reshape(batch, n_heads, 1, -1)  # (B, n_heads, 1, D)
        return x if norm is None else norm(x)
    x = x.reshape(batch, length, n_heads, -1)  # (B, L, n_heads, D)
    return (x if norm is None else norm(x)).transpose(0, 2, 1, 3)  # (B, n_heads, L, D)


def merge_heads(x: mx.array, ndim: int = 3) -> mx.array:
    """(B, n_heads, L, D) -> (B, L, n_heads * D), the inverse of :func:`split_heads`; with
    ``ndim=2`` one position becomes (B, n_heads * D)."""
    batch, _, length, _ = x.shape
    if length == 1:
        return x.reshape(batch, -1) if ndim == 2 else x.reshape(batch, 1, -1)  # (B, [1,] n_heads * D)
    return x.transpose(0, 2, 1, 3).reshape(batch, length, -1)  # (B, L, n_heads * D)


class QKNormAttention(nn.Module):
    """Grouped-query attention whose heads' queries and keys are RMS-normed (Gemma 3, Qwen 3).

    A subclass builds ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``q_norm``, ``k_norm`` and
    ``rope`` and sets ``n_heads``, ``n_kv_heads``, ``scale`` (and ``softcap``). The call is split
    in three so that :mod:`lmx.generate.segments` can compile around the cache write and attention.

    Args:
        ops: the model's :class:`OpsSlot` (shared with its norms and RoPE).
    """

    softcap: float | None = None

    def __init__(self, ops: OpsSlot | None = None) -> None:
        super().__init__()
        self.ops_slot = ops or OpsSlot()
        self.fused: FusedProducts | None = None  # q/k/v as one product (see fuse)

    def fuse(self) -> bool:
        """Run the query, key and value projections as one product (:class:`FusedProducts`)."""
        self.fused = FusedProducts.of([self.q_proj, self.k_proj, self.v_proj])
        return self.fused is not None

    def __call__(self, x: mx.array, cache: Any, pad: mx.array | None) -> mx.array:
        return self.output(self.attend(*self.project(x, rope_offset(cache.offset, pad)), cache, pad), x.ndim)

    def project(self, x: mx.array, offset: int | mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Queries, keys and values (B, heads, L, head_dim) of ``x``, normed and rotated."""
        q, k, v = products(self, (self.q_proj, self.k_proj, self.v_proj), x)
        q = split_heads(q, self.n_heads, self.q_norm)  # (B, n_heads, L, head_dim)
        k = split_heads(k, self.n_kv_heads, self.k_norm)  # (B, n_kv, L, head_dim)
        v = split_heads(v, self.n_kv_heads)
        return self.rope(q, offset=offset), self.rope(k, offset=offset), v

    def attend(self, q: mx.array, k: mx.array, v: mx.array, cache: Any, pad: mx.array | None) -> mx.array:
        """Store ``k``/``v`` in ``cache`` (a KV cache); attention of ``q`` over it (B, n_heads, L, head_dim)."""
        k, v = cache.update_and_fetch(k, v)
        ops = self.ops_slot.ops
        if isinstance(cache, DecodeSlot) and pad is None and self.softcap is None:
            # a compiled step's whole storage: the query sees the slots of the span (no mask array)
            return ops.attention_span(q, k, v, self.scale, cache.span())
        if (
            pad is not None
            and q.shape[2] == 1
            and ops.indexes_padding
            and self.softcap is None
            and isinstance(cache, KVCache)  # (other caches' masks say more than a first key)
        ):  # padded rows of a batch, one query each: the ops take each row's first key, no mask array
            first = cache.first_keys(slots(k), pad)
            if isinstance(k, tuple):  # a quantized cache's (packed, scales, biases)
                return ops.quantized_attention_from(
                    q, k, v, self.scale, first, cache.quant.group_size, cache.quant.bits
                )
            return ops.attention_from(q, k, v, self.scale, first)
        mask = cache.make_mask(q.shape[2], pad)
        if isinstance(k, tuple):  # a quantized cache's (packed, scales, biases)
            return quantized_attention(q, k, v, self.scale, mask, cache.quant, self.softcap, self.ops_slot.ops)
        return attention(q, k, v, self.scale, mask, self.softcap, self.ops_slot.ops)

    def output(self, out: mx.array, ndim: int = 3) -> mx.array:
        """The output projection of the attention ``out`` (B, n_heads, L, head_dim): (B, L, dim),
        or (B, dim) with ``ndim=2`` (one position)."""
        return product(self.ops_slot.ops, self.o_proj, merge_heads(out, ndim))


class AttentionLayer(nn.Module):
    """A decoder layer split around attention (see :mod:`lmx.generate.segments`): ``begin`` runs
    up to the queries, keys and values, the cache write and attention follow, ``end`` the rest.
    A subclass builds ``self_attn`` (a :class:`QKNormAttention`), ``input_layernorm`` and ``end``."""

    def __call__(self, x: mx.array, cache: Any, pad: mx.array | None) -> mx.array:
        q, k, v = self.begin(x, rope_offset(cache.offset, pad))
        return self.end(x, self.self_attn.attend(q, k, v, cache, pad))

    def begin(self, x: mx.array, offset: int | mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """The layer up to attention: queries, keys and values of the residual stream ``x``
        (B, L, dim), or (B, dim) for one position."""
        kernels = self.self_attn.ops_slot.ops.decode_layer_kernels()
        if kernels is not None and (fused := self._fused_begin(kernels, x, offset)) is not None:
            return fused
        return self.self_attn.project(self.input_layernorm(x), offset)

    def _fused_begin(self, kernels: Any, x: mx.array, offset: int | mx.array) -> tuple[mx.array, ...] | None:
        """:meth:`begin` of one decode position as one op of lmx's CPU kernels (the same values),
        where the projections are GGUF blocks; else None."""
        attn = self.self_attn
        blocks = decode_blocks((attn.q_proj, attn.k_proj, attn.v_proj))
        norms = norm_scales((self.input_layernorm, attn.q_norm, attn.k_norm))
        rope = attn.rope
        if not decode_rows(x) or blocks is None or norms is None or rope.mscale != 1:
            return None
        if not isinstance(offset, int):  # left-padded rows: each row's own position, (B,)
            if offset.ndim != 1:
                return None
            offset = offset.astype(mx.int32)
        (scale, q_scale, k_scale), eps = norms
        (wq, tq), (wk, tk), (wv, tv) = blocks
        head = (attn.n_heads, attn.n_kv_heads, attn.head_dim)
        return kernels.decode_layer_begin(
            x,
            scale,
            eps,
            wq,
            wk,
            wv,
            (tq, tk, tv),
            *head,
            q_scale,
            k_scale,
            eps,
            rope.dims,
            rope.periods,
            rope.scale,
            offset,
        )

    def end(self, x: mx.array, out: mx.array) -> mx.array:
        """The layer after attention: the residual stream ``x`` plus attention ``out`` and the rest."""
        raise NotImplementedError


def attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    scale: float,
    mask: mx.array | str | None,
    softcap: float | None = None,
    ops: Ops = MLX_OPS,
) -> mx.array:
    """Scaled dot-product attention over (B, heads, L, D) inputs, grouped-query aware.

    ``mask`` is a boolean array, None (every query sees every key) or ``"causal"``: query
    ``i`` of ``Lq`` sees keys up to ``Lk - Lq + i`` (MLX's fused kernels skip the rest).
    Without ``softcap`` it is one call of ``ops`` (the model's, :mod:`lmx.runtime.ops`);
    with it, the scores are capped in plain MLX ops (no fused kernel takes a cap).
    """
    if softcap is None:
        return ops.attention(queries, keys, values, scale, mask)
    if isinstance(mask, str):
        n_q, n_k = queries.shape[2], keys.shape[2]
        mask = mx.arange(n_k - n_q, n_k)[:, None] >= mx.arange(n_k)[None]  # (Lq, Lk)
    n_rep = queries.shape[1] // keys.shape[1]
    if n_rep > 1:
        keys, values = mx.repeat(keys, n_rep, axis=1), mx.repeat(values, n_rep, axis=1)
    scores = (queries * scale) @ keys.swapaxes(-1, -2)  # (B, H, Lq, Lk)
    scores = mx.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
    return mx.softmax(scores, axis=-1, precise=True) @ values


def quantized_attention(
    queries: mx.array,
    keys: Storage,
    values: Storage,
    scale: float,
    mask: mx.array | str | None,
    quant: KVQuant,
    softcap: float | None = None,
    ops: Ops = MLX_OPS,
) -> mx.array:
    """:func:`attention` over keys and values held quantized (triples of a quantized cache).

    Without ``softcap`` it is one call of ``ops.quantized_attention`` (which computes over the
    quantized values or dequantizes them, whichever the device runs faster); with it, the keys
    and values are dequantized and go through :func:`attention`.
    """
    if softcap is None:
        return ops.quantized_attention(queries, keys, values, scale, mask, quant.group_size, quant.bits)
    k = mx.dequantize(*keys, group_size=quant.group_size, bits=quant.bits)  # (B, n_kv, S, D)
    v = mx.dequantize(*values, group_size=quant.group_size, bits=quant.bits)
    return attention(queries, k, v, scale, mask, softcap, ops)


def layer_types_from(config_layer_types: list[str] | None, n_layers: int, default: list[str]) -> list[str]:
    """Validate ``layer_types`` (or take ``default``): one of full/sliding_attention per layer."""
    types_ = list(config_layer_types) if config_layer_types is not None else default
    if len(types_) != n_layers:
        raise ConfigError(f"layer_types has {len(types_)} entries for {n_layers} layers")
    bad = sorted({t for t in types_ if t not in ("full_attention", "sliding_attention")})
    if bad:
        raise ConfigError(f"layer_types holds {bad}; allowed: full_attention, sliding_attention")
    return types_


@typing.runtime_checkable
class KeepsDerived(Protocol):
    """A layer that keeps arrays derived from its weights (:class:`Linear`, Gemma's RMSNorm)."""

    def constants(self) -> list[mx.array]: ...


class LanguageModel(Protocol):
    """The contract between an architecture's ``Model`` and what runs it (the step loop, training,
    classification): :class:`CausalLM` implements it for every architecture here.

    ``hidden`` = ``norm`` of the ``layers`` over ``embed``; ``head`` makes logits of it.
    """

    args: Any

    @property
    def layers(self) -> Sequence[AttentionLayer]:
        """The decoder layers, in order (each with ``begin``, ``end`` and ``self_attn.attend``)."""
        ...

    @property
    def ops(self) -> Ops:
        """The ops the layers call."""
        ...

    def set_ops(self, ops: Ops) -> None:
        """Make every layer call ``ops`` (the loader does, once, from the load profile)."""
        ...

    def embed(self, inputs: mx.array) -> mx.array:
        """The residual stream (B, L, dim) the first layer reads, from token ids (B, L)."""
        ...

    def norm(self, h: mx.array) -> mx.array:
        """The final norm of the last layer's output."""
        ...

    def head(self, h: mx.array) -> mx.array:
        """Logits (B, L, vocab) from final-norm hidden states."""
        ...

    def hidden(
        self,
        inputs: mx.array,
        cache: Sequence[Any],
        pad: mx.array | None = None,
        each_layer: Callable[[mx.array], Any] | None = None,
    ) -> mx.array:
        """Final-norm hidden states (B, L, dim); ``each_layer`` is called with each layer's output."""
        ...

    def make_cache(self, quant: KVQuant | None = None) -> list[KVCache]:
        """One fresh cache per layer (holding keys and values quantized, given ``quant``)."""
        ...

    def constants(self) -> list[mx.array]:
        """Arrays the layers derive from their weights and keep between calls (a Linear's
        ``weight.T``, Gemma's ``1 + weight``): evaluate them before tracing a compiled step."""
        ...


class DecoderStack(nn.Module):
    """The text model: embedding, decoder layers, final norm. A subclass builds ``embed_tokens``,
    ``layers`` and ``norm`` (and overrides :meth:`embed` for a scaled embedding)."""

    def __call__(
        self,
        inputs: mx.array,
        cache: Sequence[Any],
        pad: mx.array | None = None,
        each_layer: Callable[[mx.array], Any] | None = None,
    ) -> mx.array:
        h = self.embed(inputs)
        for layer, layer_cache in zip(self.layers, cache):
            h = layer(h, layer_cache, pad)
            if each_layer is not None:
                each_layer(h)
        return self.norm(h)

    def embed(self, inputs: mx.array) -> mx.array:
        """The residual stream (B, L, hidden_size) the first layer reads."""
        return self.embed_tokens(inputs)


class Stage(Protocol):
    """This rank's part of a model split by layers over processes (pipeline parallel, see
    :mod:`lmx.models.pipeline_parallel`): it runs the layers this rank holds and passes the
    residual stream on; the logits come back to every rank."""

    def hidden(
        self,
        model: Any,
        inputs: mx.array,
        cache: Sequence[Any],
        pad: mx.array | None,
        each_layer: Callable[[mx.array], Any] | None,
    ) -> mx.array:
        """As :meth:`CausalLM.hidden`, over this rank's layers (``cache``: theirs)."""
        ...

    def head(self, model: Any, h: mx.array, local: Callable[[mx.array], mx.array]) -> mx.array:
        """The logits of the whole model on every rank; ``local`` makes them where the head is held."""
        ...

    def make_cache(self, model: Any) -> list[KVCache]:
        """One cache per layer this rank holds."""
        ...


class CausalLM(nn.Module):
    """What every architecture's ``Model`` shares (the :class:`LanguageModel` contract): a
    :class:`DecoderStack` as ``self.model``, an LM head (tied to the embedding or ``lm_head``),
    one cache per layer. A subclass builds ``self.model`` (passing :attr:`ops_slot` to every
    layer) and ``lm_head`` when untied.

    Args:
        args: the architecture's ``ModelArgs`` (with ``tie_word_embeddings``, ``layer_types``
            and ``sliding_window``).
    """

    stage: Stage | None = None  # set on a rank of a pipeline-parallel group: it holds some layers

    def __init__(self, args: Any) -> None:
        super().__init__()
        self.args = args
        self.ops_slot = OpsSlot()

    @property
    def ops(self) -> Ops:
        return self.ops_slot.ops

    def set_ops(self, ops: Ops) -> None:
        """Make every layer call ``ops`` (one slot shared by all of them)."""
        self.ops_slot.ops = ops

    @property
    def layers(self) -> list[AttentionLayer]:
        return self.model.layers

    def embed(self, inputs: mx.array) -> mx.array:
        return self.model.embed(inputs)

    def norm(self, h: mx.array) -> mx.array:
        return self.model.norm(h)

    def hidden(
        self,
        inputs: mx.array,
        cache: Sequence[Any],
        pad: mx.array | None = None,
        each_layer: Callable[[mx.array], Any] | None = None,
    ) -> mx.array:
        """Final-norm hidden states (B, L, hidden_size); ``each_layer`` sees each layer's output."""
        if self.stage is not None:
            return self.stage.hidden(self, inputs, cache, pad, each_layer)
        return self.model(inputs, cache, pad, each_layer)

    def head(self, h: mx.array) -> mx.array:
        """Logits (B, L, vocab) from hidden states."""
        if self.stage is not None:
            return self.stage.head(self, h, self._own_head)
        return self._own_head(h)

    def _own_head(self, h: mx.array) -> mx.array:
        if not self.args.tie_word_embeddings:
            return product(self.ops, self.lm_head, h)
        embed = self.model.embed_tokens
        if type(embed) is nn.QuantizedEmbedding:  # its as_linear, through the ops (see product)
            return quantized_product(self.ops, embed, h)
        if type(embed) is nn.Embedding:
            return self.ops.dense_product(h, embed["weight"])
        return embed.as_linear(h)

    def __call__(self, inputs: mx.array, cache: list[KVCache] | None = None, pad: mx.array | None = None) -> mx.array:
        return self.head(self.hidden(inputs, cache or self.make_cache(), pad))

    def make_cache(self, quant: KVQuant | None = None) -> list[KVCache]:
        """One cache per layer: rotating for sliding layers, growing for global ones; with
        ``quant``, their keys and values are stored quantized."""
        if self.stage is not None:  # pipeline parallel: this rank's layers (float caches only)
            return self.stage.make_cache(self)
        return [
            RotatingKVCache(self.args.sliding_window, quant=quant) if t == "sliding_attention" else KVCache(quant)
            for t in self.args.layer_types
        ]

    def fuse_projections(self) -> int:
        """Run each layer's query, key and value projections as one product, and its MLP's gate
        and up projections as another (:class:`FusedProducts`; the weights are held once, as
        before). The GPU profile does this at load. Returns how many groups were fused."""
        fused = 0
        for layer in self.layers:
            for part in (layer.self_attn, getattr(layer, "mlp", None)):
                if isinstance(part, (QKNormAttention, GatedMLP)):
                    fused += part.fuse()  # the unfused arrays are freed (their buffers reused by the next)
        mx.clear_cache()  # what is left of them goes back
        return fused

    def constants(self) -> list[mx.array]:
        """Arrays the layers derive from their weights and keep between calls (see :class:`Derived`)."""
        return [c for m in self.modules() if m is not self and isinstance(m, KeepsDerived) for c in m.constants()]

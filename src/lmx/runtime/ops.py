"""The ops seam: the few layer ops whose best implementation depends on the device.

A model's layers call one ops object for RMSNorm, RoPE, attention, the products of MLX
quantized layers and the log-softmax's ``logsumexp``, and a row's sampler calls it for the
nucleus filter (``top_p``) and the draw (``categorical``); which one is chosen once at load,
from the device profile (:mod:`lmx.runtime.profile`), and handed to the model with
``model.set_ops``. The models never ask which device they run on (vLLM's ``platforms/`` and
attention-backend selection are the model for this seam).

- :class:`MlxOps`: MLX's own fused ops (``mx.fast``), right everywhere.
- :class:`CpuKernelOps`: lmx's CPU kernels (:mod:`lmx.kernels`): on the CPU MLX computes
  ``mx.fast.rms_norm``, ``mx.fast.rope`` and attention as several small ops each, and Gemma's
  GELU with a scalar ``tanh`` on one thread (a decode step
  of Gemma 3 270M spent about a third of its time there); the kernels compute the same float32
  values in one op each (RMSNorm bit for bit, the others within float32 rounding), with MLX's own
  gradients. Other dtypes, array offsets and mask arrays still go to MLX.
- :class:`CudaOps`: MLX's ops plus lmx's one-query CUDA attention
  (:mod:`lmx.kernels.cuda_attention`) for head dims MLX's CUDA backend does not fuse, and for
  the left-padded rows of a batch (any head dim), where MLX needs a mask array; and lmx's
  kernel for a decode step's products by quantized weights (:mod:`lmx.kernels.cuda_quantized`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager as ContextManager
from functools import partial
from types import ModuleType
from typing import Protocol

import mlx.core as mx
import mlx.nn as nn

Mask = mx.array | str | None
Quantized = tuple[mx.array, ...]  # mx.quantize's (packed, scales, biases) of (B, n_kv, S, D) keys or values

_FLOAT32_TINY, _FLOAT32_MAX = 1.1754944e-38, 3.4028234e38  # float32's smallest normal and largest values


class Ops(Protocol):
    """What a model's layers call; ``name`` says which implementation (for ``lmx info``)."""

    name: str

    def rms_norm(self, x: mx.array, weight: mx.array, eps: float) -> mx.array: ...

    def rope(
        self,
        x: mx.array,
        dims: int,
        offset: int | mx.array,
        *,
        base: float | None,
        scale: float,
        freqs: mx.array | None,
        periods: mx.array,
    ) -> mx.array: ...

    def attention(self, q: mx.array, k: mx.array, v: mx.array, scale: float, mask: Mask) -> mx.array: ...

    # Whether :meth:`attention_from` is cheaper than building a mask array (a model asks, then picks).
    indexes_padding: bool

    def attention_from(self, q: mx.array, k: mx.array, v: mx.array, scale: float, first: mx.array) -> mx.array: ...

    def attention_span(self, q: mx.array, k: mx.array, v: mx.array, scale: float, span: mx.array) -> mx.array: ...

    def quantized_attention_from(
        self, q: mx.array, k: Quantized, v: Quantized, scale: float, first: mx.array, group_size: int, bits: int
    ) -> mx.array: ...

    def quantized_attention(
        self, q: mx.array, k: Quantized, v: Quantized, scale: float, mask: Mask, group_size: int, bits: int
    ) -> mx.array: ...

    def quantized_matmul(
        self,
        x: mx.array,
        w: mx.array,
        scales: mx.array,
        biases: mx.array | None,
        group_size: int,
        bits: int,
        mode: str,
    ) -> mx.array: ...

    def dense_product(self, x: mx.array, w: mx.array, w_t: mx.array | None = None) -> mx.array: ...

    def logsumexp(self, x: mx.array) -> mx.array: ...

    def log_softmax(self, x: mx.array) -> mx.array: ...

    def argmax(self, x: mx.array) -> mx.array: ...

    def top_p(self, logprobs: mx.array, reach: float) -> mx.array: ...

    def categorical(self, logits: mx.array, temperature: float, key: mx.array) -> mx.array: ...

    def categorical_rows(self, logits: mx.array, temperature: float, keys: Sequence[mx.array]) -> mx.array: ...

    def gelu_tanh_mul(self, gate: mx.array, up: mx.array) -> mx.array: ...

    def inference(self) -> ContextManager[None]: ...

    def decode_layer_kernels(self) -> ModuleType | None: ...


class MlxOps:
    """MLX's own fused ops."""

    name = "mlx"

    def rms_norm(self, x: mx.array, weight: mx.array, eps: float) -> mx.array:
        """RMSNorm of the last axis of ``x``, scaled by ``weight``."""
        return mx.fast.rms_norm(x, weight, eps)

    def rope(
        self,
        x: mx.array,
        dims: int,
        offset: int | mx.array,
        *,
        base: float | None,
        scale: float,
        freqs: mx.array | None,
        periods: mx.array,
    ) -> mx.array:
        """Rotary embedding (HF's half-split layout) of (B, H, L, D) ``x`` from position ``offset``:
        by ``base`` or, where given, the inverse of ``freqs``; ``periods`` (angle = position / period)
        is the same rotation for implementations that take it."""
        return mx.fast.rope(x, dims, traditional=False, base=base, scale=scale, offset=offset, freqs=freqs)

    def attention(self, q: mx.array, k: mx.array, v: mx.array, scale: float, mask: Mask) -> mx.array:
        """Scaled dot-product attention over (B, heads, L, D) inputs (grouped-query aware); ``mask`` is
        a boolean array, None or ``"causal"``."""
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)

    indexes_padding = False

    def attention_from(self, q: mx.array, k: mx.array, v: mx.array, scale: float, first: mx.array) -> mx.array:
        """One query per row (B, H, 1, D) where row ``b`` sees the keys from index ``first[b]`` (B,)
        on: :meth:`attention` with that mask, built here."""
        return self.attention(q, k, v, scale, _first_mask(k.shape[2], first))

    def attention_span(self, q: mx.array, k: mx.array, v: mx.array, scale: float, span: mx.array) -> mx.array:
        """One query per row (B, H, 1, D) where every row sees the keys ``span[0] <= i < span[1]``
        (``span`` (2,) int32: a compiled decode step's slots in use, :class:`lmx.models.cache.DecodeSlot`):
        :meth:`attention` with that mask, built here."""
        return self.attention(q, k, v, scale, span_mask(k.shape[2], span))

    def quantized_attention_from(
        self, q: mx.array, k: Quantized, v: Quantized, scale: float, first: mx.array, group_size: int, bits: int
    ) -> mx.array:
        """:meth:`attention_from` over keys and values held quantized: :meth:`quantized_attention` with that mask."""
        return self.quantized_attention(q, k, v, scale, _first_mask(k[0].shape[2], first), group_size, bits)

    def quantized_attention(
        self, q: mx.array, k: Quantized, v: Quantized, scale: float, mask: Mask, group_size: int, bits: int
    ) -> mx.array:
        """:meth:`attention` over keys and values held quantized (``mx.quantize`` triples, quantized
        along the head dimension), computed on the quantized values with ``mx.quantized_matmul``
        (no float copy of the keys and values is made). Computed in float32 whatever the dtype: MLX's
        quantized products in bfloat16 accumulate coarsely (on the CPU, outputs 20% off over 700
        keys; float32: 0.1%); only the queries, scales and biases are converted, not the packed values."""
        dtype = q.dtype
        if dtype != mx.float32:
            q = q.astype(mx.float32)
            k = (k[0], *(a.astype(mx.float32) for a in k[1:]))
            v = (v[0], *(a.astype(mx.float32) for a in v[1:]))
        batch, n_heads, n_q, dim = q.shape
        n_kv = k[0].shape[1]
        q = (q * scale).reshape(batch, n_kv, n_heads // n_kv, n_q, dim)  # (B, n_kv, rep, Lq, D)
        kq = [a[:, :, None] for a in k]  # (B, n_kv, 1, S, ·): one key head serves rep query heads
        vq = [a[:, :, None] for a in v]
        scores = mx.quantized_matmul(q, *kq, transpose=True, group_size=group_size, bits=bits)  # (B, n_kv, rep, Lq, S)
        if isinstance(mask, str):
            n_k = scores.shape[-1]
            mask = mx.arange(n_k - n_q, n_k)[:, None] >= mx.arange(n_k)[None]  # (Lq, S)
        if mask is not None:
            if mask.ndim == 4:
                mask = mask[:, :, None]  # (B or 1, 1, 1, Lq, S)
            scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
        weights = mx.softmax(scores, axis=-1, precise=True)
        out = mx.quantized_matmul(
            weights, *vq, transpose=False, group_size=group_size, bits=bits
        )  # (B, n_kv, rep, Lq, D)
        return out.reshape(batch, n_heads, n_q, dim).astype(dtype)

    def quantized_matmul(
        self,
        x: mx.array,
        w: mx.array,
        scales: mx.array,
        biases: mx.array | None,
        group_size: int,
        bits: int,
        mode: str,
    ) -> mx.array:
        """``x @ dequantize(w).T``: an ``nn.QuantizedLinear``'s product (``mx.quantized_matmul``)."""
        return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits, mode=mode)

    def dense_product(self, x: mx.array, w: mx.array, w_t: mx.array | None = None) -> mx.array:
        """``x @ w.T`` for a float weight ``w`` (N, K), as a ``Linear`` holds it; ``w_t``: its transpose
        where the caller keeps one (a view made once, not a new op each call)."""
        return x @ (w.T if w_t is None else w_t)

    def logsumexp(self, x: mx.array) -> mx.array:
        """``logsumexp`` over the last axis, keeping it (B, 1)."""
        return mx.logsumexp(x, axis=-1, keepdims=True)

    def log_softmax(self, x: mx.array) -> mx.array:
        """``x - logsumexp(x)`` over the last axis: log-probabilities of logits."""
        return x - self.logsumexp(x)

    def argmax(self, x: mx.array) -> mx.array:
        """Each row's index of its largest value over the last axis (uint32; the first of ties)."""
        return mx.argmax(x, axis=-1)

    def top_p(self, logprobs: mx.array, reach: float) -> mx.array:
        """The nucleus filter of (B, V) log-probabilities (unnormalised, ``-inf`` allowed): most
        likely first, a token is kept while the probability mass of the tokens before it is below
        ``reach``; the first is always kept, so are the ties of the last one kept; the rest get -inf."""
        desc = -mx.sort(-logprobs, axis=-1)  # (B, V) most likely first
        probs = mx.softmax(desc, axis=-1)
        before = mx.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
        n_keep = mx.maximum(mx.sum(before < reach, axis=-1, keepdims=True), 1)  # (B, 1)
        threshold = mx.take_along_axis(desc, n_keep - 1, axis=-1)  # (B, 1) least likely kept
        return mx.where(logprobs >= threshold, logprobs, -mx.inf)

    def categorical(self, logits: mx.array, temperature: float, key: mx.array) -> mx.array:
        """One draw per row of (B, V) ``logits`` from ``softmax(logits / temperature)`` (B,)."""
        return mx.random.categorical(logits / temperature, key=key)

    def categorical_rows(self, logits: mx.array, temperature: float, keys: Sequence[mx.array]) -> mx.array:
        """One draw per row of (G, V) ``logits``, row ``i`` with its own ``keys[i]`` (G,): what row
        ``i`` draws depends on its logits and its key only, not on the other rows (a seeded request
        draws the same alone or batched). One set of ops for all rows (MLX's draw of a 1-D row,
        mapped over the rows), not one per row."""
        return _categorical_rows(logits / temperature, mx.stack(list(keys)))

    def gelu_tanh_mul(self, gate: mx.array, up: mx.array) -> mx.array:
        """``gelu_pytorch_tanh(gate) * up``: a gated MLP's activation (Gemma 3), one compiled kernel."""
        return _geglu_tanh(gate, up)

    def inference(self) -> ContextManager[None]:
        """Graphs built inside are never differentiated (a decode step): ops may skip their gradient set-up."""
        return contextlib.nullcontext()

    def decode_layer_kernels(self) -> ModuleType | None:
        """The kernels module whose fused decode-layer ops (``decode_layer_begin``/``_end``, no
        gradient) the layers may call now, or None: only lmx's CPU kernels, inside :meth:`inference`."""
        return None


def span_mask(n_keys: int, span: mx.array) -> mx.array:
    """(1, 1, 1, S): every row sees the keys ``span[0] <= i < span[1]`` ((2,) int32)."""
    slot = mx.arange(n_keys)
    return ((slot >= span[0]) & (slot < span[1]))[None, None, None]


def _first_mask(n_keys: int, first: mx.array) -> mx.array:
    """(B, 1, 1, S): row ``b`` sees the keys from index ``first[b]`` on."""
    return (mx.arange(n_keys)[None] >= first[:, None])[:, None, None]


# Row i of the result is mx.random.categorical(logits[i], key=keys[i]): the vmapped draw makes the
# same random bits for each key as drawing alone (one RandomBits op for every row).
_categorical_rows = mx.vmap(lambda row, key: mx.random.categorical(row, key=key))
# The same for one uniform number a row (the CPU kernels' draw): row i is uniform((1,), key=keys[i]).
_uniform_rows = mx.vmap(lambda key: mx.random.uniform(shape=(1,), key=key))


@partial(mx.compile, shapeless=True)
def _geglu_tanh(gate: mx.array, up: mx.array) -> mx.array:
    return nn.gelu_approx(gate) * up


class CpuKernelOps(MlxOps):
    """lmx's CPU kernels (the built :mod:`lmx.kernels` module) for norms, RoPE, attention and logsumexp.

    Args:
        kernels: the kernels module (``lmx.kernels``' built extension).
    """

    name = "cpu-kernels"

    def __init__(self, kernels: ModuleType) -> None:
        self.kernels = kernels
        self._inference = threading.local()  # per thread: a server's workers build steps side by side

    @contextlib.contextmanager
    def inference(self) -> Iterator[None]:
        depth = getattr(self._inference, "depth", 0)
        self._inference.depth = depth + 1
        try:
            yield
        finally:
            self._inference.depth = depth

    def decode_layer_kernels(self) -> ModuleType | None:
        # A decode layer's pieces around attention as one op each (lmx.kernels' decode_layer.h): a
        # Gemma 3 270M step was 496 ops of a few microseconds each; the same values, no gradient.
        return self.kernels if getattr(self._inference, "depth", 0) else None

    def rms_norm(self, x: mx.array, weight: mx.array, eps: float) -> mx.array:
        return self.kernels.rms_norm(x, weight, eps)

    def rope(
        self,
        x: mx.array,
        dims: int,
        offset: int | mx.array,
        *,
        base: float | None,
        scale: float,
        freqs: mx.array | None,
        periods: mx.array,
    ) -> mx.array:
        if isinstance(offset, int):
            return self.kernels.rope(x, dims, periods, scale, offset)
        if offset.ndim == 1:  # each row of a left-padded batch from its own position: one op, not MLX's ~15
            return self.kernels.rope_rows(x, dims, periods, scale, offset.astype(mx.int32))
        return super().rope(x, dims, offset, base=base, scale=scale, freqs=freqs, periods=periods)

    def attention(self, q: mx.array, k: mx.array, v: mx.array, scale: float, mask: Mask) -> mx.array:
        if not isinstance(mask, mx.array):
            return self.kernels.attention(q, k, v, scale, mask == "causal")
        if mask.dtype == mx.bool_:  # a prompt past a sliding window, or padded prompts (few queries: MLX's)
            return self.kernels.attention_masked(q, k, v, scale, mask)
        return super().attention(q, k, v, scale, mask)

    # Padded rows of a batch, one query each, attend from each row's first key in one op: the same
    # loops as the row alone (its very values), where MLX's masked attention took a product, a select
    # and a softmax a layer, single-threaded (8 rows of Gemma 3 270M: 70-75 ms a step against 48).
    indexes_padding = True

    def attention_from(self, q: mx.array, k: mx.array, v: mx.array, scale: float, first: mx.array) -> mx.array:
        return self.kernels.attention_from(q, k, v, scale, first.astype(mx.int32))

    def quantized_attention_from(
        self, q: mx.array, k: Quantized, v: Quantized, scale: float, first: mx.array, group_size: int, bits: int
    ) -> mx.array:
        # The quantized cache's padded rows: one op reading the quantized bytes from each row's first key, where
        # the mask path dequantized every layer's whole cache and ran MLX's masked attention.
        return self.kernels.quantized_attention_from(q, *k, *v, scale, first.astype(mx.int32), group_size, bits)

    def quantized_attention(
        self, q: mx.array, k: Quantized, v: Quantized, scale: float, mask: Mask, group_size: int, bits: int
    ) -> mx.array:
        # One op reading the quantized bytes (each row dequantized in registers): MLX's quantized
        # products, or dequantizing then attending, cost 4-5x the float kernel here (RESULTS.md).
        if not isinstance(mask, mx.array) and q.shape[2] <= 8:
            return self.kernels.quantized_attention(q, *k, *v, scale, mask == "causal", group_size, bits)
        # A prompt, or a mask array: the dequantized values through this object's own attention (the
        # BLAS prompt kernel), so a quantized cache's prompt rounds as a float cache of those values does.
        keys = mx.dequantize(*k, group_size=group_size, bits=bits)  # (B, n_kv, S, D)
        values = mx.dequantize(*v, group_size=group_size, bits=bits)
        return self.attention(q, keys, values, scale, mask)

    def logsumexp(self, x: mx.array) -> mx.array:
        # One vectorised op: MLX's CPU exp took 7 ms of a decode step for a 262k vocabulary
        # (benchmarks/RESULTS.md, change 11).
        return self.kernels.logsumexp(x)

    def log_softmax(self, x: mx.array) -> mx.array:
        # One threaded op, bit for bit MLX's subtract of logsumexp(), which ran single-threaded.
        return self.kernels.log_softmax(x)

    def argmax(self, x: mx.array) -> mx.array:
        # Threaded and vectorised, MLX's rule (first of ties, first NaN): its one-thread argmax took 6.5 ms
        # of an 8-row Gemma 3 decode step (262,144 logits a row) under a loaded pool (RESULTS.md).
        return self.kernels.argmax(x)

    def top_p(self, logprobs: mx.array, reach: float) -> mx.array:
        # One op that sorts one bucket of each row, not the row: MLX's sort took 25 ms a row of a
        # 262k vocabulary, more than the 270M's decode step (benchmarks/RESULTS.md).
        if logprobs.dtype != mx.float32 or logprobs.ndim < 1 or logprobs.shape[-1] == 0:
            return super().top_p(logprobs, reach)
        return self.kernels.top_p(logprobs, reach)

    def categorical(self, logits: mx.array, temperature: float, key: mx.array) -> mx.array:
        # One uniform number a row and the inverted distribution: MLX's Gumbel draw takes two logs a
        # token, 3.5 ms a row of a 262k vocabulary (benchmarks/RESULTS.md). Other draws: the same
        # distribution, other random numbers than MLX's for a given key.
        if logits.dtype != mx.float32 or logits.ndim != 2:
            return super().categorical(logits, temperature, key)
        return self._draw(logits, mx.random.uniform(shape=(logits.shape[0],), key=key), temperature)

    def categorical_rows(self, logits: mx.array, temperature: float, keys: Sequence[mx.array]) -> mx.array:
        # Row i's uniform number from keys[i] alone: a one-row batch draws as categorical() does.
        if logits.dtype != mx.float32 or logits.ndim != 2:
            return super().categorical_rows(logits, temperature, keys)
        return self._draw(logits, _uniform_rows(mx.stack(list(keys))).reshape(-1), temperature)

    def _draw(self, logits: mx.array, u: mx.array, temperature: float) -> mx.array:
        # Any positive temperature the options allow, within float32's normal range (1e300: uniform
        # over the finite tokens; 1e-300: the most likely one, as dividing the logits by it would give).
        return self.kernels.categorical(logits, u, min(max(temperature, _FLOAT32_TINY), _FLOAT32_MAX))

    def gelu_tanh_mul(self, gate: mx.array, up: mx.array) -> mx.array:
        # One threaded, vectorised op: MLX's took 27-38 ms a layer for a 512-token Gemma 3 270M prompt.
        return self.kernels.gelu_tanh_mul(gate, up)


class CudaOps(MlxOps):
    """MLX's ops on a CUDA GPU, with lmx's CUDA kernels where MLX's are slow:

    - one query without a mask whose head dim MLX does not fuse (Gemma 3's 256) as one op
      (:func:`lmx.kernels.cuda_attention.decode_attention`) instead of MLX's 12 fallback ops;
    - in a decode step (inside :meth:`inference`), products of up to 8 rows by large 4- or 8-bit
      MLX affine matrices (:func:`lmx.kernels.cuda_quantized.decode_product`): MLX's own reads
      them at a fraction of the card's bandwidth;
    - in a decode step, products of up to 8 rows by float matrices
      (:func:`lmx.kernels.cuda_dense.decode_product`): MLX's own costs the host 2.3x as much to queue.

    Args:
        cuda: the attention kernel's module (:mod:`lmx.kernels.cuda_attention`; it also keeps the
            :meth:`inference` state), given by whoever chose the profile (kernels/ sits beside
            runtime/, not below it).
        padded: the left-padded rows of a batch take the attention kernel too (by each row's
            first key, :func:`lmx.kernels.cuda_attention.decode_attention_from`), any head dim.
        quantized: the product kernel's module (:mod:`lmx.kernels.cuda_quantized`), or None
            (``LMX_CUDA_QUANTIZED=0``): MLX's products.
        attention: whether the attention kernel runs (``LMX_CUDA_ATTENTION``).
        dense: the float product kernel's module (:mod:`lmx.kernels.cuda_dense`), or None
            (``LMX_CUDA_DENSE=0``): MLX's products.
    """

    name = "cuda-kernels"

    def __init__(
        self,
        cuda: ModuleType,
        padded: bool = False,
        quantized: ModuleType | None = None,
        attention: bool = True,
        dense: ModuleType | None = None,
    ) -> None:
        self.cuda = cuda
        self.indexes_padding = padded and attention
        self.quantized = quantized
        self.attends = attention
        self.dense = dense

    def attention(self, q: mx.array, k: mx.array, v: mx.array, scale: float, mask: Mask) -> mx.array:
        if self.attends and mask is None and self.cuda.fits(q, k, v, scale):
            return self.cuda.decode_attention_fitted(q, k, v, scale)  # fits() has checked them
        return super().attention(q, k, v, scale, mask)

    def quantized_matmul(
        self,
        x: mx.array,
        w: mx.array,
        scales: mx.array,
        biases: mx.array | None,
        group_size: int,
        bits: int,
        mode: str,
    ) -> mx.array:
        q = self.quantized
        if (
            q is not None
            and self.cuda.inference_active()  # the kernel has no gradient
            and q.wanted(x, w, scales, biases, group_size, bits, mode)  # (affine only: biases present)
        ):
            return q.decode_product(x, w, scales, biases, group_size, bits)
        return super().quantized_matmul(x, w, scales, biases, group_size, bits, mode)

    def dense_product(self, x: mx.array, w: mx.array, w_t: mx.array | None = None) -> mx.array:
        d = self.dense
        if d is not None and self.cuda.inference_active() and d.supported(x, w):  # the kernel has no gradient
            return d.decode_product(x, w)
        return super().dense_product(x, w, w_t)

    # With ``padded`` (``LMX_CUDA_PADDED_ATTENTION``), padded rows of a batch: one kernel instead of a
    # mask array and MLX's masked attention (which no MLX CUDA kernel fuses for one query).
    def attention_from(self, q: mx.array, k: mx.array, v: mx.array, scale: float, first: mx.array) -> mx.array:
        if self.indexes_padding and scale > 0 and self.cuda.inference_active() and self.cuda.supported(q, k, v):
            return self.cuda.decode_attention_from(q, k, v, scale, first)
        return super().attention_from(q, k, v, scale, first)

    # A compiled decode step's attention over its fixed storage: one kernel that reads only the
    # slots in use, where the mask would take MLX's unfused path (no MLX CUDA kernel takes a mask
    # for one query), whatever the head dim.
    def attention_span(self, q: mx.array, k: mx.array, v: mx.array, scale: float, span: mx.array) -> mx.array:
        if self.attends and scale > 0 and self.cuda.inference_active() and self.cuda.supported(q, k, v):
            return self.cuda.decode_attention_span(q, k, v, scale, span)
        return super().attention_span(q, k, v, scale, span)

    def inference(self) -> ContextManager[None]:
        return self.cuda.inference()


MLX_OPS = MlxOps()  # stateless: one shared instance is the default of every model

__all__ = ["MLX_OPS", "CpuKernelOps", "CudaOps", "Mask", "MlxOps", "Ops", "Quantized"]

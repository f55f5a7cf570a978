"""The step loop: chunked prefill, then one token per step with the next step queued early.

Everything else (text streaming, stop strings, metrics, batching, chat) wraps
:func:`generate_step`, which yields ``(tokens, logprobs)`` for a batch of rows.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import mlx.core as mx
import mlx.nn as nn

from lmx.generate.segments import SegmentedDecode, segmented_decode
from lmx.models.base import cpu_ops
from lmx.models.cache import DecodeSlot, KVCache
from lmx.runtime.device import device_name

Processor = Callable[[mx.array, mx.array], mx.array]
Sampler = Callable[[mx.array, mx.array], mx.array]


def default_prefill_step_size() -> int:
    """The prompt chunk of a prefill: 512 tokens on a GPU, 128 on the CPU. On the CPU a chunk's
    speed is the same at 128 and 512 tokens, and its transient memory a quarter (GGUF on the
    kernels: 13 MiB above weights + KV instead of 38-50 for a 512-token prompt; RESULTS.md change 12)."""
    return 512 if device_name() == "gpu" else 128


def prefill(
    model: nn.Module,
    tokens: mx.array,
    cache: list[KVCache],
    pad: mx.array | None = None,
    step_size: int | None = None,
    layerwise: bool | None = None,
) -> mx.array:
    """Run all of ``tokens`` (B, L) through the model; return the last position's logits (B, V).

    The prompt goes in chunks of ``step_size`` (None: :func:`default_prefill_step_size`) so
    activations stay bounded; only the last
    position goes through the LM head (the largest matmul for a 262k vocabulary).
    ``layerwise`` (None: on a GPU) hands each layer's work to the device as soon as it is
    built (``mx.async_eval``): MLX's CUDA backend keeps an op's inputs until the batch of work
    holding it completes, so a chunk built whole keeps every layer's intermediates alive at
    once (Gemma 3 270M: 80 MiB above the weights for 512 tokens, against a 13 MiB KV cache).
    """
    step_size = step_size or default_prefill_step_size()
    if layerwise is None:
        layerwise = device_name() == "gpu"
    hidden = _layerwise_hidden if layerwise and hasattr(model.model, "embed") else _hidden
    while tokens.shape[1] > step_size:
        hidden(model, tokens[:, :step_size], cache, pad)
        mx.eval([c.state for c in cache])
        tokens = tokens[:, step_size:]
    h = hidden(model, tokens, cache, pad)
    return model.head(h[:, -1:, :])[:, 0, :]


def _hidden(model: nn.Module, tokens: mx.array, cache: list[KVCache], pad: mx.array | None) -> mx.array:
    return model.hidden(tokens, cache, pad)


def _layerwise_hidden(model: nn.Module, tokens: mx.array, cache: list[KVCache], pad: mx.array | None) -> mx.array:
    """``model.hidden``, each layer's output queued on the device as soon as it is built."""
    text = model.model
    h = text.embed(tokens)
    for layer, layer_cache in zip(model.layers, cache):
        h = layer(h, layer_cache, pad)
        mx.async_eval(h)
    return text.norm(h)


class CompiledDecode:
    """One decode step (all layers and the LM head) as a compiled MLX graph.

    Building a step's graph op by op from Python costs more than running it for small
    models on a GPU; compiled, the graph is traced once and replayed, and MLX fuses its
    element-wise ops. Shapes must not change between steps, so the caches take part
    through :class:`DecodeSlot`: their storage goes in and comes out whole, and the write
    slot and the position are int32 arrays. A cache's storage grows (or a sliding one
    wraps) in :meth:`KVCache.reserve`, outside the graph; a new storage size traces anew.

    The model's arrays are inputs of the graph (not constants), so weights updated in place
    (``model.update``, LoRA layers swapped in) are used; one instance serves every request
    on a model (see :func:`compiled_decode`).

    Args:
        model: a model with ``hidden`` and ``head`` (held weakly).
        windows: each layer's sliding window (None for global layers).
        padded: whether calls pass a ``pad`` array.
    """

    def __init__(self, model: nn.Module, windows: tuple[int | None, ...], padded: bool) -> None:
        ref = weakref.ref(model)  # the model holds this object: no reference cycle
        self.padded = padded

        def step(
            token: mx.array, keys: list[mx.array], values: list[mx.array], index: mx.array, position: mx.array, *pad
        ) -> tuple[mx.array, list[mx.array], list[mx.array]]:
            m = ref()
            assert m is not None
            slots = [DecodeSlot(k, v, index[i], position, w) for i, (k, v, w) in enumerate(zip(keys, values, windows))]
            h = m.hidden(token[:, None], slots, pad[0] if pad else None)
            return m.head(h)[:, -1, :], [s.keys for s in slots], [s.values for s in slots]

        # The children, not the model: the model holds this object, and a graph input that
        # held the model would make a reference cycle (memory freed only by the GC).
        self._step = mx.compile(step, inputs=model.children())

    def __call__(self, token: mx.array, cache: list[KVCache], pad: mx.array | None = None) -> mx.array:
        """Logits (B, V) for ``token`` (B,); every cache advances by one position."""
        assert (pad is not None) == self.padded
        index = mx.array([c.reserve(1) for c in cache], dtype=mx.int32)
        position = mx.array(cache[0].offset, dtype=mx.int32)
        extra = (pad,) if pad is not None else ()
        logits, keys, values = self._step(
            token, [c.keys for c in cache], [c.values for c in cache], index, position, *extra
        )
        for c, k, v in zip(cache, keys, values):
            c.advance(k, v, 1)
        return logits


class _Decoders:
    """The compiled decode steps of one model, keyed by cache layout (kept on the model)."""

    def __init__(self) -> None:
        self.steps: dict[tuple[tuple[int | None, ...], bool], CompiledDecode] = {}


def compiled_decode(model: nn.Module, cache: list[KVCache], padded: bool) -> CompiledDecode:
    """The model's :class:`CompiledDecode` for this cache layout, made on first use.

    Kept on the model object, so every request after the first replays the traced graph
    instead of tracing again, and it goes away with the model.
    """
    decoders = getattr(model, "_lmx_decoders", None)
    if not isinstance(decoders, _Decoders):
        decoders = _Decoders()
        object.__setattr__(model, "_lmx_decoders", decoders)
    key = (tuple(c.window for c in cache), padded)
    if key not in decoders.steps:
        decoders.steps[key] = CompiledDecode(model, *key)
    return decoders.steps[key]


class Decoder:
    """One-token decode steps for a batch of rows: ``(tokens (B,), cache, pad) -> logits (B, V)``.

    The step runs as compiled segments where that pays (a GPU: see
    :mod:`lmx.generate.segments`), else eagerly; padded rows' attention masks are built once
    per cache layout and step, not once per layer. ``logsumexp`` is the log-softmax's
    normaliser for these logits (one op on lmx's CPU kernels).

    Args:
        model: a model with ``hidden`` and ``head``.
        segments: use the segmented step for unpadded rows; None: on a GPU.
    """

    def __init__(self, model: nn.Module, segments: bool | None = None) -> None:
        self.model = model
        self.segments = device_name() == "gpu" if segments is None else segments
        ops = cpu_ops(model)
        self.logsumexp = ops.logsumexp if ops is not None else partial(mx.logsumexp, axis=-1, keepdims=True)
        self._segmented: SegmentedDecode | None = None
        self.refresh()

    def refresh(self) -> None:
        """Check the segmented step against the model's current weights (after an adapter
        was loaded or removed, say); called when a batch starts."""
        self._segmented = segmented_decode(self.model) if self.segments else None

    def __call__(self, tokens: mx.array, cache: list[KVCache], pad: mx.array | None) -> mx.array:
        masks: dict = {}  # the step's masks, built once per cache layout instead of once per layer
        for c in cache:
            c.masks = masks
        try:
            if self._segmented is not None:
                return self._segmented(tokens, cache, pad)
            return self.model.head(self.model.hidden(tokens[:, None], cache, pad))[:, -1, :]
        finally:
            for c in cache:
                c.masks = None


def generate_step(
    model: nn.Module,
    prompt: mx.array,
    cache: list[KVCache],
    sampler: Sampler,
    keys: Callable[[], mx.array],
    *,
    history: mx.array | None = None,
    processors: Sequence[Processor] = (),
    pad: mx.array | None = None,
    prefill_step_size: int | None = None,
    compile: bool = False,
    segments: bool | None = None,
) -> Iterator[tuple[mx.array, mx.array]]:
    """Yield ``(tokens (B,), logprobs (B, V))`` forever; the caller decides when to stop.

    Args:
        model: a model with ``hidden`` and ``head``.
        prompt: (B, L) ids not yet in ``cache`` (L >= 1).
        cache: the per-layer caches; they may already hold a prefix of the prompt.
        sampler: ``(logprobs, key) -> tokens``.
        keys: returns the next random key.
        history: (B, T) every token so far (cached prefix + prompt), for the processors.
        processors: ``(history, logits) -> logits`` callables.
        pad: (B,) left-padding counts for a padded batch.
        prefill_step_size: prompt chunk size (None: :func:`default_prefill_step_size`).
        compile: run each decode step as one compiled graph (:class:`CompiledDecode`). Off by
            default, as measured (benchmarks/RESULTS.md): on a CUDA GPU the whole-storage
            attention mask sends attention to MLX's unfused path, which costs Qwen 3 more
            than compiling saves; on the CPU it gains ~3% after a first call that waits for
            the C++ compiler.
        segments: run each decode step as compiled segments around eager attention
            (:class:`lmx.generate.segments.SegmentedDecode`); None (the default) does so on a
            GPU, where a step is bound by per-operation host cost, and not on the CPU. Used
            only for rows without padding, and not with ``compile``.
    """
    history = prompt if history is None else history
    # On lmx's CPU kernels one vectorised op: MLX's CPU exp took 7 ms of a decode step for a
    # 262k vocabulary (benchmarks/RESULTS.md, change 11).
    ops = cpu_ops(model)
    logsumexp = ops.logsumexp if ops is not None else partial(mx.logsumexp, axis=-1, keepdims=True)

    def sample(logits: mx.array) -> tuple[mx.array, mx.array]:
        nonlocal history
        logits = logits.astype(mx.float32)
        for proc in processors:
            logits = proc(history, logits)
        logprobs = logits - logsumexp(logits)
        token = sampler(logprobs, keys())
        if processors:
            history = mx.concatenate([history, token[:, None].astype(history.dtype)], axis=1)
        return token, logprobs

    def forward(token: mx.array) -> mx.array:
        return model.head(model.hidden(token[:, None], cache, pad))[:, -1, :]

    token, logprobs = sample(prefill(model, prompt, cache, pad, prefill_step_size))
    mx.async_eval(token, logprobs)  # the device runs the prefill while the decode step is set up
    if segments is None:
        segments = device_name() == "gpu"
    if compile:
        step = compiled_decode(model, cache, pad is not None)

        def decode(token: mx.array) -> mx.array:
            return step(token, cache, pad)
    elif segments and pad is None and (segmented := segmented_decode(model)) is not None:

        def decode(token: mx.array) -> mx.array:
            return segmented(token, cache)
    else:
        decode = forward
    while True:
        # Queue the next step before handing this one over: the device works on it
        # while the caller detokenizes and checks stop conditions.
        next_token, next_logprobs = sample(decode(token))
        mx.async_eval(next_token, next_logprobs)
        yield token, logprobs
        token, logprobs = next_token, next_logprobs

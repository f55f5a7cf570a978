"""The step loop: chunked prefill, then one token per step with the next step queued early.

Everything else (text streaming, stop strings, metrics, batching, chat) wraps
:func:`generate_step`, which yields ``(tokens, logprobs)`` for a batch of rows. How it prefills
and decodes is a plan (:class:`lmx.runtime.profile.StepPlan`, part of the profile chosen at
load), kept with the traces made for it in a :class:`DecodeState`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import mlx.core as mx

from lmx.generate.encoder import StepEncoder
from lmx.generate.segments import CompiledDecode, SegmentedDecode
from lmx.models.base import LanguageModel
from lmx.models.cache import KVCache
from lmx.models.image_prompt import ImagePrompt
from lmx.runtime.profile import StepPlan

Processor = Callable[[mx.array, mx.array], mx.array]
Sampler = Callable[[mx.array, mx.array], mx.array]


def prefill(
    model: LanguageModel,
    tokens: mx.array,
    cache: list[KVCache],
    pad: mx.array | None = None,
    step_size: int | None = None,
    layerwise: bool = False,
) -> mx.array:
    """Run all of ``tokens`` (B, L) through the model; return the last position's logits (B, V).

    The prompt goes in chunks of ``step_size`` (None: the portable plan's, see
    :class:`StepPlan`) so activations stay bounded; only the last position goes through
    the LM head (the largest matmul for a 262k vocabulary). ``layerwise`` queues each layer's
    output (``mx.async_eval``) as soon as it is built instead of the whole chunk at its end
    (the plan's ``prefill_mode``; :class:`StepPlan` says why).
    """
    step_size = step_size or StepPlan().prefill_step_size
    each_layer = mx.async_eval if layerwise else None
    while tokens.shape[1] > step_size:
        model.hidden(tokens[:, :step_size], cache, pad, each_layer)
        mx.eval([c.state for c in cache])
        tokens = tokens[:, step_size:]
    h = model.hidden(tokens, cache, pad, each_layer)
    return model.head(h[:, -1:, :])[:, 0, :]


class DecodeState:
    """What the step loop keeps for one model between generations: its plan (from the profile
    chosen at load) and the traces made for it (compiled decode steps by cache layout, the segmented step).

    Whoever holds the loaded model (the engine, a benchmark) makes one and passes it to every
    :func:`generate_step` on that model, so each trace is made once; it goes away with its holder.

    Args:
        model: the model (the :class:`LanguageModel` contract).
        plan: how to prefill and decode (a :class:`StepPlan`, or the loaded model's whole profile;
            None: the portable plan).
    """

    def __init__(self, model: LanguageModel, plan: StepPlan | None = None) -> None:
        self.model = model
        self.plan = plan or StepPlan()
        self._compiled: dict[tuple[tuple[int | None, ...], bool], CompiledDecode] = {}
        self._segments: SegmentedDecode | None = None
        self._encoder: StepEncoder | None = None

    def compiled(self, cache: list[KVCache], padded: bool) -> CompiledDecode | None:
        """The model's :class:`CompiledDecode` for this cache layout (made on first use), ready for
        its current weights; None where a module draws random numbers in its current mode (as
        :meth:`segmented`) or the model holds only some layers (a pipeline-parallel rank: its step
        sends and receives between them). Traces are made on the stream of the step that first
        calls it, as :meth:`segmented` says."""
        if getattr(self.model, "stage", None) is not None:
            return None
        key = (tuple(c.window for c in cache), padded)
        if key not in self._compiled:
            self._compiled[key] = CompiledDecode(self.model, *key)
        step = self._compiled[key]
        return step if step.prepare() else None

    def segmented(self) -> SegmentedDecode | None:
        """The model's :class:`SegmentedDecode`, ready for its current weights, or None where a
        module draws random numbers in its current mode (dropout while training). The check per
        generation is one walk over the model's arrays.

        A trace replays its ops on the stream it was made on. With the plan's ``encode_thread``
        every step of this state is built on the encoder's stream (:func:`generate_step`, the
        scheduler), so its traces are made there; the plan is fixed, so one state never mixes the two."""
        if self._segments is None:
            self._segments = SegmentedDecode(self.model)
        return self._segments if self._segments.prepare() else None

    def encoder(self) -> StepEncoder:
        """The model's :class:`StepEncoder` (the plan's ``encode_thread``), made on first use."""
        if self._encoder is None:
            self._encoder = StepEncoder(mx.default_device())
        return self._encoder

    @property
    def segments_made(self) -> bool:
        """Whether a segmented step was made for this model."""
        return self._segments is not None


def eager_step(model: LanguageModel, tokens: mx.array, cache: list[KVCache], pad: mx.array | None) -> mx.array:
    """Logits (B, V) for ``tokens`` (B,), the step built op by op; every cache advances by one
    position. Inside the ops' ``inference()``: a decode step is never differentiated, so lmx's
    kernels without gradients may run."""
    with model.ops.inference():
        return model.head(model.hidden(tokens[:, None], cache, pad))[:, -1, :]


class Decoder:
    """One-token decode steps for the rows of a batch: ``(tokens (B,), cache, pad) -> logits (B, V)``.

    The step runs as compiled segments where the plan says so (a GPU: see
    :mod:`lmx.generate.segments`), padded rows included, else eagerly; padded rows' attention
    masks are built once per cache layout and step, not once per layer. ``ops`` are the model's
    ops, whose log-softmax and argmax choose tokens from these logits (one op each on lmx's CPU kernels).

    Args:
        state: the model's :class:`DecodeState` (its plan and traces).
    """

    def __init__(self, state: DecodeState) -> None:
        self.state = state
        self.model = state.model
        self.segments = state.plan.decode_mode == "segmented"
        self.layerwise = state.plan.prefill_mode == "layerwise"
        self.prefill_step_size = state.plan.prefill_step_size
        self.ops = state.model.ops
        self._segmented: SegmentedDecode | None = None
        self.refresh()

    def refresh(self) -> None:
        """Check the segmented step against the model's current weights (after an adapter
        was loaded or removed, say); called when a batch starts."""
        self._segmented = self.state.segmented() if self.segments else None

    def prefill(self, tokens: mx.array, cache: list[KVCache], pad: mx.array | None, step_size: int) -> mx.array:
        """:func:`prefill` as the plan says (chunks of ``step_size``, layer by layer or whole)."""
        return prefill(self.model, tokens, cache, pad, step_size, layerwise=self.layerwise)

    def prefill_images(self, tokens: mx.array, cache: list[KVCache], images: ImagePrompt) -> mx.array:
        """Last-position logits (1, V) of one prompt chunk ``tokens`` (1, L) of a prompt with
        images (the model's ``hidden_images``: soft tokens in, image blocks bidirectional). The
        caller chunks it so that no image block is split (:meth:`ImagePrompt.chunk_end`)."""
        each_layer = mx.async_eval if self.layerwise else None
        h = self.model.hidden_images(tokens, cache, images, each_layer)  # type: ignore[attr-defined]
        return self.model.head(h[:, -1:, :])[:, 0, :]

    def __call__(
        self, tokens: mx.array, cache: list[KVCache], pad: mx.array | None, *, eager: bool = False
    ) -> mx.array:
        """Logits (B, V) for ``tokens`` (B,); ``eager``: build the step op by op even where the
        plan says segments (rows routed to LoRA adapters: the traces hold the base model only)."""
        masks: dict = {}  # the step's masks, built once per cache layout instead of once per layer
        for c in cache:
            c.masks = masks
        try:
            if self._segmented is not None and not eager:
                return self._segmented(tokens, cache, pad)
            return eager_step(self.model, tokens, cache, pad)
        finally:
            for c in cache:
                c.masks = None


def generate_step(
    model: LanguageModel,
    prompt: mx.array,
    cache: list[KVCache],
    sampler: Sampler,
    keys: Callable[[], mx.array],
    *,
    history: mx.array | None = None,
    processors: Sequence[Processor] = (),
    pad: mx.array | None = None,
    prefill_step_size: int | None = None,
    compile: bool | None = None,
    segments: bool | None = None,
    state: DecodeState | None = None,
) -> Iterator[tuple[mx.array, mx.array]]:
    """Yield ``(tokens (B,), logprobs (B, V))`` forever; the caller decides when to stop.

    Args:
        model: the model (the :class:`LanguageModel` contract).
        prompt: (B, L) ids not yet in ``cache`` (L >= 1).
        cache: the per-layer caches; they may already hold a prefix of the prompt.
        sampler: ``(logprobs, key) -> tokens``.
        keys: returns the next random key.
        history: (B, T) every token so far (cached prefix + prompt), for the processors.
        processors: ``(history, logits) -> logits`` callables.
        pad: (B,) left-padding counts for a padded batch.
        prefill_step_size: prompt chunk size (None: the plan's).
        compile: run each decode step as one compiled graph
            (:class:`lmx.generate.segments.CompiledDecode`); None: as the plan says
            (``decode_mode="compiled"``: off by default, as measured in benchmarks/RESULTS.md).
            Quantized caches decode eagerly (the compiled step writes float storage).
        segments: run each decode step as compiled segments around eager attention
            (:class:`lmx.generate.segments.SegmentedDecode`); None: as the plan says
            (``decode_mode="segmented"``). Used only for rows without padding, and not with
            ``compile``.
        state: the model's :class:`DecodeState` (its plan, and the traces kept from earlier
            calls); None: a fresh one with the portable plan.
    """
    state = state or DecodeState(model)
    plan = state.plan
    if compile is None:
        compile = plan.decode_mode == "compiled"
    compile = compile and all(c.quant is None for c in cache)
    if segments is None:
        segments = plan.decode_mode == "segmented"
    history = prompt if history is None else history

    def sample(logits: mx.array) -> tuple[mx.array, mx.array]:
        nonlocal history
        logits = logits.astype(mx.float32)
        for proc in processors:
            logits = proc(history, logits)
        logprobs = model.ops.log_softmax(logits)
        token = sampler(logprobs, keys())
        if processors:
            history = mx.concatenate([history, token[:, None].astype(history.dtype)], axis=1)
        return token, logprobs

    step_size = prefill_step_size or plan.prefill_step_size
    encoder = state.encoder() if plan.encode_thread else None
    if encoder is not None:
        yield from _threaded_steps(state, encoder, prompt, cache, sample, pad, step_size, segments, compile)
        return
    first = prefill(model, prompt, cache, pad, step_size, layerwise=plan.prefill_mode == "layerwise")
    token, logprobs = sample(first)
    mx.async_eval(token, logprobs)  # the prefill runs while the decode step is set up
    decode = _decode_for(state, cache, pad, segments, compile)
    while True:
        # Queue the next step before handing this one over: MLX works on it
        # while the caller detokenizes and checks stop conditions.
        next_token, next_logprobs = sample(decode(token))
        mx.async_eval(next_token, next_logprobs)
        yield token, logprobs
        token, logprobs = next_token, next_logprobs


def _decode_for(
    state: DecodeState, cache: list[KVCache], pad: mx.array | None, segments: bool, compile: bool
) -> Callable[[mx.array], mx.array]:
    """A generation's decode step, ``token (B,) -> logits (B, V)``: the compiled step, the
    segmented one (rows without padding) or the eager one, as asked and where it can run."""
    if compile and (step := state.compiled(cache, pad is not None)) is not None:
        return lambda token: step(token, cache, pad)
    if segments and pad is None and (segmented := state.segmented()) is not None:
        return lambda token: segmented(token, cache)
    return lambda token: eager_step(state.model, token, cache, pad)


def _threaded_steps(
    state: DecodeState,
    encoder: StepEncoder,
    prompt: mx.array,
    cache: list[KVCache],
    sample: Callable[[mx.array], tuple[mx.array, mx.array]],
    pad: mx.array | None,
    step_size: int,
    segments: bool,
    compile: bool,
) -> Iterator[tuple[mx.array, mx.array]]:
    """:func:`generate_step`'s loop with each step queued by ``encoder``'s thread while this
    thread builds the next (see :mod:`lmx.generate.encoder`). Every op of the generation is
    built on the encoder's stream, so all of it runs in one order on the device.

    The caller's thread reads only arrays no later step's graph holds (a token is handed out
    as a copy: the next step's graph holds the original), and waits for its last step to be
    queued and run before the generator ends, so nothing of it is queued from two threads."""
    model = state.model
    plan = state.plan
    with mx.stream(encoder.stream):
        first = prefill(model, prompt, cache, pad, step_size, layerwise=plan.prefill_mode == "layerwise")
        token, logprobs = sample(first)
        mx.eval(token, logprobs)
        decode = _decode_for(state, cache, pad, segments, compile)  # its traces are made on this stream

    out = token, logprobs  # evaluated: safe to read while a step holding ``token`` is queued
    queued = None
    try:
        while True:
            with mx.stream(encoder.stream):  # not across the yield: the caller's own ops stay on its stream
                next_token, next_logprobs = sample(decode(token))
                handed = mx.stop_gradient(next_token)  # for the caller; the next step's graph holds next_token
            if queued is not None:
                queued.wait()  # the step of ``out`` is queued: reading it waits for the device only
            queued = encoder.submit(next_token, next_logprobs, handed)  # before the yield: waited for at the end
            yield out
            token, out = next_token, (handed, next_logprobs)
    finally:
        if queued is not None:
            queued.wait()
        mx.synchronize(encoder.stream)

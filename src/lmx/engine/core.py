"""The engine: a thin facade over the scheduler that owns the model.

Every call (generate, stream, chat, batch_generate, classify) becomes requests of the
:class:`lmx.scheduler.Scheduler`, which runs them all, alone or batched, on one worker thread."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import mlx.core as mx

from lmx.classify import Classification
from lmx.engine.checks import CLASSIFY_OPTIONS, check_draft_vocabulary, check_keywords, flatten, id_set
from lmx.engine.report import affine_values, gguf_report, parallel_report
from lmx.engine.stream import TokenStream, collect
from lmx.errors import ContextLengthError, EngineClosedError, InvalidOptionError
from lmx.generate.images import FeatureCache, check_pan_and_scan, has_images, lay_out
from lmx.generate.options import GenerationOptions, check_token_ids
from lmx.generate.step import Decoder, DecodeState
from lmx.generate.tools import parse_tool_calls, plan_tools
from lmx.loading import LoadedModel
from lmx.models.image_prompt import ImagePrompt, image_digest
from lmx.results import Completion, GenerationMetrics, ModelInfo
from lmx.runtime import memory, settings
from lmx.runtime.device import device_name
from lmx.scheduler import QueueSink, Request, Scheduler, SchedulerConfig, SchedulerStats, make_request

Prompt = str | Sequence[int]
Message = dict[str, Any]
logger = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_PREFIX_CACHE_BYTES = 1 << 30
"""The prefix cache's default bound (1 GiB); ``lmx.load(prefix_cache_bytes=...)`` changes it."""


class Engine:
    """A loaded model and its tokenizer, serving any number of requests at once.

    Use :func:`lmx.load` to make one. Requests from any thread run together as rows of one
    continuously batched decode loop (:mod:`lmx.scheduler`), each with its own options: see
    :class:`lmx.GenerationOptions` (max_tokens, temperature, top_k, top_p, min_p,
    repetition/presence/frequency penalties, logit_bias, seed, stop, logprobs).

    Args:
        loaded: the loaded model.
        prompt_cache: keep the keys/values of earlier prompts and reuse their common prefix.
        prefill_step_size: prompt tokens per prefill chunk (None: 2048 on a GPU, 128 on the CPU).
        max_batch: the most requests decoded together.
        max_queue: the most requests waiting to start (more: :class:`lmx.errors.QueueFullError`).
        prefix_cache_bytes: the prefix cache's bound.
        draft: a small model of the same vocabulary that drafts for requests with
            ``speculative="draft-model"`` (see :func:`lmx.load`'s ``draft_model``).

    Raises:
        DraftModelError: ``draft``'s vocabulary is not the model's.
        kv_bits: store keys and values quantized to 8 or 4 bits (None: in the model's dtype).
        kv_group_size: elements of a head per scale and bias of quantized keys and values.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        prompt_cache: bool = True,
        prefill_step_size: int | None = None,
        max_batch: int = 32,
        max_queue: int = 1024,
        prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
        draft: LoadedModel | None = None,
        kv_bits: int | None = None,
        kv_group_size: int = 64,
    ) -> None:
        if draft is not None:
            check_draft_vocabulary(loaded, draft)
            mx.eval([v for _, v in flatten(draft.model.parameters())])
        self.draft = draft
        self._loaded: LoadedModel | None = loaded
        self.prompt_cache = prompt_cache
        # None: the load profile's (512 tokens on a GPU, 128 on the CPU)
        self.prefill_step_size = prefill_step_size or loaded.profile.prefill_step_size
        self.metrics = GenerationMetrics()
        gen_cfg = loaded.generation_config
        self.context_length = int(loaded.config.get("max_position_embeddings") or 8192)
        self.default_options = GenerationOptions()
        self.eos = frozenset(loaded.tokenizer.eos_token_ids) | id_set(gen_cfg.get("eos_token_id"))
        params = flatten(loaded.model.parameters())
        mx.eval([v for _, v in params])  # made on this thread; the scheduler's worker uses them
        floats = (v for _, v in params if mx.issubdtype(v.dtype, mx.floating))
        itemsize = next(floats).dtype.size  # activations, and so the KV cache, take this dtype
        config = SchedulerConfig(
            max_batch=max_batch,
            max_queue=max_queue,
            prefill_step_size=self.prefill_step_size,
            prefix_cache_bytes=prefix_cache_bytes if prompt_cache else 0,
            kv_itemsize=itemsize,
            kv_bits=kv_bits,
            kv_group_size=kv_group_size,
        )
        if loaded.group is not None:
            config.step_timeout = settings.LMX_TP_STEP_TIMEOUT.get()
        decoder = Decoder(DecodeState(loaded.model, loaded.profile))  # the step loop's plan and its traces
        self.scheduler = Scheduler(
            loaded.model,
            loaded.tokenizer,
            self.eos,
            config,
            decoder,
            draft_model=draft.model if draft else None,
            sync=loaded.group,
        )
        self._lock = threading.Lock()
        self._adapters: Any = None  # the AdapterSet, made when the first adapter loads
        self.image_cache = FeatureCache()  # the vision tower's output for the last images seen

    # ----------------------------------------------------------------- properties
    @property
    def loaded(self) -> LoadedModel:
        if self._loaded is None:
            raise EngineClosedError("the engine is closed; load the model again with lmx.load()")
        return self._loaded

    @property
    def model(self) -> Any:
        return self.loaded.model

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    # ----------------------------------------------------------------- public API
    def generate(self, prompt: Prompt, **options: Any) -> Completion:
        """Generate a completion of ``prompt`` (text, or token ids used as they are)."""
        return collect(self.stream(prompt, **options))

    def stream(self, prompt: Prompt, *, sink: Any = None, **options: Any) -> TokenStream:
        """Like :meth:`generate`, yielding :class:`Token` objects as they are made.

        ``sink`` (a :class:`lmx.scheduler.Sink`): deliver the tokens there instead (the server
        does, to its event loop); the stream is then not iterated.
        """
        return self._submit(self.encode_prompt(prompt), self.options(options), sink)

    def chat(
        self,
        messages: list[Message],
        *,
        tools: list[dict] | None = None,
        tool_choice: Any = None,
        chat_template_kwargs: dict | None = None,
        pan_and_scan: bool | None = None,
        **options: Any,
    ) -> Completion:
        """Reply to a conversation (a list of ``{"role", "content"}`` dicts).

        ``pan_and_scan``: crop long images (Gemma 3), True or False for this request; None
        (default): as the checkpoint's ``preprocessor_config.json`` says.

        ``tools`` (OpenAI function tools) are rendered through the chat template (see
        :mod:`lmx.generate.tools`); the reply's calls are then in ``Completion.tool_calls`` and
        ``text`` is the rest. ``tool_choice``: ``"auto"`` (default), ``"none"``, ``"required"``
        or ``{"type": "function", "function": {"name": ...}}``.
        """
        kwargs = chat_template_kwargs or {}
        stream = self.stream_chat(
            messages,
            tools=tools,
            tool_choice=tool_choice,
            chat_template_kwargs=kwargs,
            pan_and_scan=pan_and_scan,
            **options,
        )
        done = collect(stream)
        if not tools:
            return done
        plan = plan_tools(self.tokenizer, messages, tools, tool_choice, kwargs.get("chat_template"))
        if not plan.parse:
            return done
        text, calls = parse_tool_calls(done.text, plan.style, plan.prefix)
        return dataclasses.replace(done, text=text, tool_calls=calls)

    def stream_chat(
        self,
        messages: list[Message],
        *,
        tools: list[dict] | None = None,
        tool_choice: Any = None,
        chat_template_kwargs: dict | None = None,
        sink: Any = None,
        pan_and_scan: bool | None = None,
        **options: Any,
    ) -> TokenStream:
        """Like :meth:`chat`, streaming the raw reply (read calls out of it with
        :class:`lmx.generate.tools.ToolCallParser`). A follow-up turn only prefills its new tokens."""
        opts = self.options(options)
        check_pan_and_scan(pan_and_scan)
        kwargs = chat_template_kwargs or {}
        plan = plan_tools(self.tokenizer, messages, tools, tool_choice, kwargs.get("chat_template"))
        images = None
        if has_images(plan.messages):
            ids, images = self._image_prompt(plan.messages, plan.template_tools, kwargs, pan_and_scan)
        else:
            ids = self.tokenizer.encode_chat(
                plan.messages, add_generation_prompt=True, tools=plan.template_tools, **kwargs
            )
        if plan.prefix:  # a required call: the reply starts inside it
            ids = ids + self.tokenizer.encode(plan.prefix, add_special_tokens=False)
        return self._submit(self.encode_prompt(ids), opts, sink, images)

    def batch_generate(self, prompts: Sequence[Prompt], **options: Any) -> list[Completion]:
        """Generate for several prompts at once (rows of one batch); each result equals
        generating its prompt alone (greedy: token for token)."""
        if isinstance(prompts, (str, bytes, bytearray)) or not isinstance(prompts, Sequence):
            raise InvalidOptionError(
                f"prompts must be a list of prompts (strings or token-id lists), got {type(prompts).__name__}; "
                "for one prompt use generate()"
            )
        opts = self.options(options)
        encoded = [self.encode_prompt(p) for p in prompts]
        streams: list[TokenStream] = []
        try:
            for ids in encoded:
                streams.append(self._submit(ids, opts))
            return [collect(s) for s in streams]
        finally:
            for s in streams:
                s.close()

    def classify(self, texts: Sequence[str], labels: Sequence[str], **options: Any) -> list[Classification]:
        """Sort each text into one of ``labels``; see :func:`lmx.classify.classify`.

        A label's score is the model's probability of the label's whole token sequence as
        the answer, normalised over the labels.
        """
        from lmx.classify import classify

        check_keywords("classify", options, CLASSIFY_OPTIONS)
        return classify(self, texts, labels, **options)

    def embed(self, texts: str | Sequence[str | Sequence[int]], *, batch_size: int = 16) -> list[list[float]]:
        """One unit-length vector per text (or token-id list): the mean of the model's
        final-norm hidden states over its tokens; see :mod:`lmx.embed` for what they are good
        for (a base model's pooled states are no trained embedding model).

        Raises:
            InvalidOptionError, ContextLengthError, EngineClosedError.
        """
        from lmx.embed import embed

        return embed(self, texts, batch_size=batch_size).vectors

    def run_exclusive(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` with the model to itself, between two decode steps of the running
        requests (which pause meanwhile); return its result. The model runs with the default
        ``adapter`` option's adapter (``lmx.load(adapter=...)``) on every row, if there is one."""
        self.loaded  # noqa: B018 - raises EngineClosedError when closed
        adapter, adapters = self.default_options.adapter, self._adapters
        if adapter is None or adapters is None:
            return self.scheduler.run_exclusive(fn)

        def routed() -> T:
            adapters.route([adapter])  # one name for one row: every row of any batch
            try:
                return fn()
            finally:
                adapters.route(())

        return self.scheduler.run_exclusive(routed)

    def stats(self) -> SchedulerStats:
        """The scheduler's counts and load: running and waiting requests, steps, KV bytes, prefix cache."""
        return self.scheduler.stats()

    def info(self) -> ModelInfo:
        """Describe the loaded model."""
        loaded = self.loaded
        params = dict(flatten(loaded.model.parameters()))
        bits = (loaded.quantization or {}).get("bits")
        n_params = sum(
            v.size * (32 // bits) if bits and k.endswith(".weight") and v.dtype == mx.uint32 else v.size
            for k, v in params.items()
            if not k.endswith((".scales", ".biases")) or not bits
        )
        if loaded.cpu_kernels:  # GGUF-block weights: count values, not bytes
            from lmx.models.gguf_layers import gguf_block_values

            n_params += gguf_block_values(loaded.model)
        if loaded.gguf_affine:  # GGUF matrices in MLX affine form, of several bit widths
            n_params += affine_values(loaded)
        dtypes = {str(v.dtype).replace("mlx.core.", "") for v in params.values() if mx.issubdtype(v.dtype, mx.floating)}
        cfg = loaded.config
        gguf = gguf_report(loaded) if loaded.source.endswith(".gguf") else {}
        quant, kv = self.scheduler.kv_quant, self.scheduler.kv_budget
        return ModelInfo(
            name=loaded.name,
            source=loaded.source,
            model_type=str(cfg.get("model_type")),
            num_parameters=int(n_params),
            num_layers=len(loaded.model.layers),
            hidden_size=int(cfg.get("hidden_size", 0)),
            vocab_size=int(cfg.get("vocab_size", 0)),
            context_length=self.context_length,
            dtype=",".join(sorted(dtypes)),
            quantization=loaded.quantization,
            device=device_name(),
            weights_bytes=int(sum(v.nbytes for v in params.values())),
            profile=loaded.profile.as_dict(),
            chat_template=loaded.chat_template_origin,
            compute_dtype=str(loaded.profile.as_dict().get("dtype", "")),
            tensor_parallel=parallel_report(loaded),
            kv_bits=quant.bits if quant else None,
            kv_group_size=quant.group_size if quant else None,
            kv_bytes_per_token=kv.position_bytes(),
            **gguf,
        )

    def load_adapter(self, path: str | os.PathLike, name: str | None = None) -> str:
        """Load the LoRA adapter in directory ``path`` under ``name``, beside any others.

        Requests pick it with the generation option ``adapter=name``; rows with different
        adapters (or none) run in the same batch, each with its own. Safe while requests run:
        the files are read on the calling thread, then the adapter is installed between two
        decode steps. All or nothing: an adapter that does not fit the model changes nothing.

        Args:
            path: the adapter directory (``adapters.safetensors`` + ``adapter_config.json``,
                as ``lmx train`` writes it).
            name: the name requests use; None: the directory's name.

        Returns:
            The adapter's name.

        Raises:
            InvalidOptionError: a bad name, or one already loaded.
            ModelNotFoundError: no adapter at ``path``.
            WeightsError: the files are corrupt, or the adapter's target modules, rank or
                shapes do not fit this model (named in the message).
        """
        from lmx.train.adapters import AdapterSet

        adapter = AdapterSet.read(path, name)

        def work() -> str:
            if self._adapters is None:
                self._adapters = AdapterSet(self.model)
            self._adapters.install(adapter)
            self.scheduler.adapters = self._adapters
            self.scheduler.decoder.refresh()
            return adapter.name

        self.loaded  # noqa: B018 - raises EngineClosedError when closed
        return self.scheduler.run_exclusive(work)

    def unload_adapter(self, name: str | None = None) -> bool:
        """Unload adapter ``name`` (None: every adapter); return whether one was unloaded.

        An adapter that running or waiting requests use is not unloaded under them: the call
        refuses with :class:`lmx.errors.AdapterInUseError` (cancel those requests, or let them
        end, and call again). Unloading the default adapter (``lmx.load(adapter=...)``) makes
        the base model the default again.

        Raises:
            InvalidOptionError: no adapter ``name`` is loaded (the loaded ones are listed).
            AdapterInUseError: requests use it.
        """

        from lmx.train.adapters import AdapterSet

        def work() -> bool:
            adapters = self._adapters if self._adapters is not None else AdapterSet(self.model)
            names = adapters.unload(name, self.scheduler.adapters_in_use())
            for n in names:
                self.scheduler.prefix_cache.clear(n)  # its cached keys/values: a new adapter may take the name
            if not names:
                return False
            if self.default_options.adapter in names:
                self.default_options = dataclasses.replace(self.default_options, adapter=None)
            self.scheduler.decoder.refresh()
            return True

        self.loaded  # noqa: B018 - raises EngineClosedError when closed
        return self.scheduler.run_exclusive(work)

    def adapters(self) -> list[str]:
        """The names of the loaded adapters, in load order."""
        return [] if self._adapters is None else self._adapters.names()

    def adapter_path(self, name: str) -> str:
        """The directory adapter ``name`` was loaded from.

        Raises:
            InvalidOptionError: no adapter ``name`` is loaded.
        """
        from lmx.train.adapters import unknown_adapter_message

        if name not in self.adapters():
            raise InvalidOptionError(unknown_adapter_message(name, self.adapters()))
        return self._adapters.get(name).path

    def clear_prefix_cache(self) -> int:
        """Drop every cached prompt's keys and values (between two decode steps; running requests
        keep theirs) and give their memory back; return the bytes the cache held."""

        def work() -> int:
            held = self.scheduler.prefix_cache.nbytes
            self.scheduler.prefix_cache.clear()
            memory.clear_cache()
            return held

        return self.run_exclusive(work)

    @property
    def is_leader(self) -> bool:
        """Whether this process takes requests: always, but on ranks 1.. of a tensor-parallel group."""
        group = self.loaded.group
        return group is None or group.leader

    def follow(self) -> None:
        """On ranks 1.. of a tensor-parallel group: run rank 0's requests in step with it (its
        batches, its decisions) until rank 0 closes its engine; then close this one.

        Raises:
            InvalidOptionError: this engine is not a follower.
        """
        if self.is_leader:
            raise InvalidOptionError(
                "follow() runs on ranks 1.. of a tensor-parallel group; this engine takes requests"
            )
        try:
            self.scheduler.follow()
        finally:
            self.close()

    def close(self) -> None:
        """End every running request (they finish ``cancelled``), then free the model, its
        caches and MLX's cached buffers. Idempotent; safe with streams still open."""
        with self._lock:
            split = self._loaded is not None and self._loaded.group is not None
            self.scheduler.close()
            self._loaded = None
            self.image_cache.clear()
            self.draft = None
        try:
            memory.clear_cache()
        except RuntimeError as e:  # a collective that lost its peer reports it at MLX's next sync point
            if not split:
                raise
            logger.debug("after the tensor-parallel group was lost: %s", e)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # An engine dropped without close(): its worker thread holds the model, so tell it to
        # stop and free it (no wait: this may run at interpreter exit). Open streams hold the
        # engine, so this never cuts a request short.
        scheduler = self.__dict__.get("scheduler")
        if scheduler is not None:
            scheduler.close(timeout=None)

    # ----------------------------------------------------------------- requests
    def options(self, options: dict[str, Any]) -> GenerationOptions:
        """Check generation options (keyword arguments) and merge them over the defaults.

        Raises:
            InvalidOptionError: an unknown option (with the nearest known name) or a bad value.
        """
        opts = GenerationOptions.from_kwargs(base=self.default_options, **options)
        opts.validate(vocab_size=int(self.loaded.config.get("vocab_size", 0)) or None)
        if opts.speculative == "draft-model" and self.draft is None:
            raise InvalidOptionError(
                "speculative='draft-model' needs a draft model: load the engine with lmx.load(..., draft_model=PATH) "
                "(lmx serve/generate --draft-model PATH), or use speculative='prompt-lookup'"
            )
        if opts.adapter is not None and opts.adapter not in self.adapters():
            from lmx.train.adapters import unknown_adapter_message

            raise InvalidOptionError(unknown_adapter_message(opts.adapter, self.adapters()))
        return opts

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids of ``prompt`` (text, or ids checked against the vocabulary).

        Raises:
            InvalidOptionError: an empty prompt, ids out of range, or another type.
            ContextLengthError: the prompt does not fit the context.
        """
        if isinstance(prompt, (bytes, bytearray)):  # a Sequence of ints, but surely not token ids
            hint = "; decode bytes first (prompt.decode('utf-8'))" if isinstance(prompt, bytes) else ""
            raise InvalidOptionError(
                f"prompt must be a string or a list of token ids, got {type(prompt).__name__}{hint}"
            )
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
            vocab = int(self.loaded.config.get("vocab_size", 0))
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                check_token_ids(ids, vocab)  # raises, naming the ids (huge ones by their size)
        else:
            raise InvalidOptionError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise InvalidOptionError("prompt is empty: give at least one token of text")
        if len(ids) >= self.context_length:
            raise ContextLengthError(
                f"prompt has {len(ids)} tokens; the model's context length is {self.context_length}"
            )
        return ids

    def submit(
        self, ids: list[int], options: GenerationOptions, sink: Any, images: ImagePrompt | None = None
    ) -> Request:
        """Queue a request of checked ``ids`` and ``options`` (see :meth:`encode_prompt`,
        :meth:`options`) whose tokens go to ``sink`` (a :class:`lmx.scheduler.Sink`); ``images``:
        the prompt's images (see :meth:`stream_chat`).

        Raises:
            QueueFullError, OutOfMemoryError, EngineClosedError.
        """
        self.loaded  # noqa: B018 - raises EngineClosedError when closed
        return self.scheduler.submit(make_request(ids, options, sink, self.context_length, images))

    def _submit(
        self, ids: list[int], opts: GenerationOptions, sink: Any = None, images: ImagePrompt | None = None
    ) -> TokenStream:
        sink = QueueSink() if sink is None else sink
        return TokenStream(self, self.submit(ids, opts, sink, images), sink)

    def _image_prompt(
        self, messages: list[Message], tools: Any, kwargs: dict[str, Any], pan_and_scan: bool | None = None
    ) -> tuple[list[int], ImagePrompt]:
        """Token ids of a chat with image parts, and its images encoded by the vision tower (on
        the scheduler's worker, between two decode steps): see :mod:`lmx.generate.images`.

        Raises:
            ImageError: the model reads no images, or an image cannot be used.
        """
        model, loaded = self.model, self.loaded
        layout = lay_out(
            self.tokenizer,
            model,
            loaded.image_processor,
            messages,
            model_name=loaded.name,
            tools=tools,
            template_kwargs=kwargs,
            pan_and_scan=pan_and_scan,
        )
        ids, pixels, starts = layout.ids, layout.pixels, layout.starts
        digests = [image_digest(p) for p in pixels]

        def work() -> mx.array:  # on the scheduler's worker: MLX arrays are made where they are evaluated
            features = self.image_cache.features(digests, pixels, lambda todo: model.encode_images(mx.array(todo)))
            mx.eval(features)
            return features

        return ids, ImagePrompt(starts, self.run_exclusive(work), digests)

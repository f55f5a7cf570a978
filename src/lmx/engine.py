"""The engine: load a model once, then generate, stream, chat and batch over it."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import mlx.core as mx

from lmx import memory
from lmx.classify import Classification
from lmx.errors import ContextLengthError, EngineClosedError, InvalidOptionError, LmxError
from lmx.generate.options import GenerationOptions
from lmx.generate.sampling import KeySequence, make_logits_processors, make_sampler, top_logprobs
from lmx.generate.step import DecodeState, generate_step
from lmx.generate.stopping import StopStringMatcher
from lmx.loader import LoadedModel, load_model
from lmx.models.cache import KVCache, trim_caches
from lmx.results import Completion, GenerationMetrics, ModelInfo, Token
from lmx.runtime.device import choose_device, device_name
from lmx.tokenizer import common_prefix

Prompt = str | Sequence[int]
Message = dict[str, Any]


class TokenStream:
    """An iterator of :class:`Token`; after it ends, ``metrics``, ``finish_reason``, ``text``
    and ``tokens`` describe the whole generation. ``close()`` stops it early."""

    def __init__(
        self,
        tokens: Iterator[Token],
        metrics: GenerationMetrics,
        request: tuple[list[int], GenerationOptions] | None = None,
    ) -> None:
        self._it = tokens
        self.metrics = metrics
        self.request = request  # (prompt ids, options): lets a scheduler batch it with others
        self.finish_reason: str | None = None
        self.text = ""
        self.tokens: list[int] = []

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> Token:
        return self._record(next(self._it))

    def _record(self, token: Token) -> Token:
        self.text += token.text
        self.tokens.append(token.id)
        if token.finish_reason is not None:
            self.finish_reason = token.finish_reason
        return token

    def close(self) -> None:
        """Stop generating; the engine is free again."""
        self._it.close()  # type: ignore[attr-defined]

    def __enter__(self) -> TokenStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Engine:
    """A loaded model and its tokenizer; one request runs at a time.

    Use :func:`lmx.load` to make one. Options of every generating method: see
    :class:`lmx.GenerationOptions` (max_tokens, temperature, top_k, top_p, min_p,
    repetition/presence/frequency penalties, logit_bias, seed, stop, logprobs).
    """

    def __init__(self, loaded: LoadedModel, *, prompt_cache: bool = True, prefill_step_size: int | None = None) -> None:
        self._loaded: LoadedModel | None = loaded
        self.prompt_cache = prompt_cache
        # None: the load profile's (512 tokens on a GPU, 128 on the CPU)
        self.prefill_step_size = prefill_step_size or loaded.profile.prefill_step_size
        # the step loop's plan and the traces made for this model (dropped with it on close)
        self.decode_state: DecodeState | None = DecodeState(loaded.model, loaded.profile)
        self.metrics = GenerationMetrics()
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._cache: list[KVCache] | None = None
        self._cache_tokens: list[int] = []
        gen_cfg = loaded.generation_config
        self.context_length = int(loaded.config.get("max_position_embeddings") or 8192)
        self.default_options = GenerationOptions()
        self._eos = frozenset(loaded.tokenizer.eos_token_ids) | _ids(gen_cfg.get("eos_token_id"))
        floats = (v for _, v in _flatten(loaded.model.parameters()) if mx.issubdtype(v.dtype, mx.floating))
        self._kv_itemsize = next(floats).dtype.size  # activations, and so the KV cache, take this dtype

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
        return _collect(self.stream(prompt, **options))

    def stream(self, prompt: Prompt, **options: Any) -> TokenStream:
        """Like :meth:`generate`, yielding :class:`Token` objects as they are made."""
        opts = self._options(options)
        ids = self._encode(prompt)
        metrics = GenerationMetrics()
        return TokenStream(self._run(ids, opts, metrics), metrics, (ids, opts))

    def chat(self, messages: list[Message], *, chat_template_kwargs: dict | None = None, **options: Any) -> Completion:
        """Reply to a conversation (a list of ``{"role", "content"}`` dicts)."""
        return _collect(self.stream_chat(messages, chat_template_kwargs=chat_template_kwargs, **options))

    def stream_chat(
        self, messages: list[Message], *, chat_template_kwargs: dict | None = None, **options: Any
    ) -> TokenStream:
        """Like :meth:`chat`, streaming. A follow-up turn only prefills its new tokens."""
        ids = self.tokenizer.encode_chat(messages, add_generation_prompt=True, **(chat_template_kwargs or {}))
        return self.stream(ids, **options)

    def batch_generate(self, prompts: Sequence[Prompt], **options: Any) -> list[Completion]:
        """Generate for several prompts at once (left-padded batch); greedy results equal
        generating each prompt alone."""
        from lmx.generate.batch import batch_generate

        opts = self._options(options)
        encoded = [self._encode(p) for p in prompts]
        with self._busy():
            self._cache, self._cache_tokens = None, []
            return batch_generate(self, encoded, opts)

    def classify(self, texts: Sequence[str], labels: Sequence[str], **options: Any) -> list[Classification]:
        """Sort each text into one of ``labels``; see :func:`lmx.classify.classify`.

        A label's score is the model's probability of the label's whole token sequence as
        the answer, normalised over the labels.
        """
        from lmx.classify import classify

        return classify(self, texts, labels, **options)

    def info(self) -> ModelInfo:
        """Describe the loaded model."""
        loaded = self.loaded
        params = dict(_flatten(loaded.model.parameters()))
        bits = (loaded.quantization or {}).get("bits")
        n_params = sum(
            v.size * (32 // bits) if bits and k.endswith(".weight") and v.dtype == mx.uint32 else v.size
            for k, v in params.items()
            if not k.endswith((".scales", ".biases")) or not bits
        )
        if loaded.cpu_kernels:  # GGUF-block weights: count values, not bytes
            from lmx.models.gguf_layers import gguf_block_values

            n_params += gguf_block_values(loaded.model)
        dtypes = {str(v.dtype).replace("mlx.core.", "") for v in params.values() if mx.issubdtype(v.dtype, mx.floating)}
        cfg = loaded.config
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
        )

    def load_adapter(self, path: str | os.PathLike) -> Any:
        """Apply the LoRA adapter in directory ``path``, replacing any loaded one."""
        from lmx.train.lora import load_adapter

        with self._busy():
            self._cache, self._cache_tokens = None, []  # cached keys/values came from other weights
            return load_adapter(self.model, path)

    def unload_adapter(self) -> bool:
        """Remove the LoRA adapter; return whether one was loaded."""
        from lmx.train.lora import unload_adapter

        with self._busy():
            self._cache, self._cache_tokens = None, []
            return unload_adapter(self.model)

    def close(self) -> None:
        """Free the model, its caches and MLX's cached buffers. Idempotent."""
        with self._lock:
            self._loaded, self.decode_state = None, None
            self._cache, self._cache_tokens = None, []
        memory.clear_cache()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- internals
    def _options(self, options: dict[str, Any]) -> GenerationOptions:
        opts = GenerationOptions.from_kwargs(base=self.default_options, **options)
        opts.validate(vocab_size=int(self.loaded.config.get("vocab_size", 0)) or None)
        return opts

    def _encode(self, prompt: Prompt) -> list[int]:
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
                raise InvalidOptionError(f"prompt token ids must be in [0, {vocab}), got {bad[:5]}")
        else:
            raise InvalidOptionError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise InvalidOptionError("prompt is empty: give at least one token of text")
        if len(ids) >= self.context_length:
            raise ContextLengthError(
                f"prompt has {len(ids)} tokens; the model's context length is {self.context_length}"
            )
        return ids

    def _busy(self) -> _Busy:
        return _Busy(self)

    def _reuse_cache(self, ids: list[int]) -> tuple[list[KVCache], int]:
        """The cache to use and how many leading prompt tokens it already holds."""
        if self.prompt_cache and self._cache is not None:
            common = min(common_prefix(self._cache_tokens, ids), len(ids) - 1)  # one token must run for logits
            if trim_caches(self._cache, len(self._cache_tokens) - common):
                self._cache_tokens = self._cache_tokens[:common]
                return self._cache, common
        self._cache, self._cache_tokens = self.model.make_cache(), []
        return self._cache, 0

    def _check_kv_memory(self, cache: list[KVCache], positions: int, batch: int = 1) -> None:
        """Raise :class:`OutOfMemoryError` before the KV cache grows past the memory limit.

        Checked before prefill and again as generation reaches each new cache block, so a
        long request fails typed when the memory runs out instead of crashing the process.
        """
        args = self.model.args
        need = memory.kv_cache_bytes(
            [c.window for c in cache],
            args.num_key_value_heads,
            args.head_dim,
            positions,
            self._kv_itemsize,
            batch=batch,
        ) - sum(c.nbytes for c in cache)
        if need > 0:
            memory.check_allocation(
                need, f"the KV cache for {positions} positions (use a shorter prompt or a lower max_tokens)"
            )

    def _run(self, ids: list[int], opts: GenerationOptions, metrics: GenerationMetrics) -> Iterator[Token]:
        busy = self._busy()
        busy.__enter__()
        generated: list[int] = []
        cache: list[KVCache] = []
        ok = False
        try:
            model, tokenizer = self.model, self.tokenizer
            cache, start = self._reuse_cache(ids)
            max_tokens = min(opts.max_tokens, self.context_length - len(ids))
            stop_ids = self._eos | {s for s in opts.stop if isinstance(s, int)}
            matcher = StopStringMatcher(s for s in opts.stop if isinstance(s, str))
            detok = tokenizer.detokenizer()
            processors = make_logits_processors(opts, prompt_len=len(ids))
            keys = KeySequence(opts.seed)
            metrics.prompt_tokens, metrics.cached_tokens = len(ids), start
            self._check_kv_memory(cache, len(ids) + 1)
            memory.reset_peak()
            t0 = time.perf_counter()
            t_first = t0
            steps = generate_step(
                model,
                mx.array([ids[start:]]),
                cache,
                make_sampler(opts.temperature, opts.top_k, opts.top_p, opts.min_p),
                keys.next,
                history=mx.array([ids]) if processors else None,
                processors=processors,
                prefill_step_size=self.prefill_step_size,
                state=self.decode_state,
            )
            try:
                for token, logprobs in steps:
                    tid = int(token.item())
                    if not generated:
                        t_first = time.perf_counter()
                        metrics.time_to_first_token = t_first - t0
                    generated.append(tid)
                    top = None
                    if opts.logprobs:
                        top_ids, top_vals = top_logprobs(logprobs, opts.logprobs)
                        top = tuple(zip(top_ids[0].tolist(), top_vals[0].tolist()))
                    finish = None
                    if tid in stop_ids:
                        finish, text = "stop", matcher.feed(detok.finalize()) + matcher.flush()
                    else:
                        text = matcher.feed(detok.add_token(tid))
                        if matcher.stopped:
                            finish = "stop"
                        elif len(generated) >= max_tokens:
                            text += matcher.feed(detok.finalize())
                            finish = "stop" if matcher.stopped else "length"
                            text += matcher.flush()
                    metrics.generated_tokens = len(generated)
                    yield Token(tid, text, float(logprobs[0, tid].item()), top, finish)
                    if finish:
                        break
                    # the step loop runs one token ahead: look two positions on
                    self._check_kv_memory(cache, len(ids) + len(generated) + 2)
            finally:
                steps.close()
                t_end = time.perf_counter()
                metrics.total_time = t_end - t0
                if metrics.time_to_first_token > 0:
                    metrics.prefill_tokens_per_s = (len(ids) - start) / metrics.time_to_first_token
                if len(generated) > 1 and t_end > t_first:
                    metrics.decode_tokens_per_s = (len(generated) - 1) / (t_end - t_first)
                metrics.peak_memory, metrics.active_memory = memory.peak(), memory.active()
                self.metrics = metrics
            ok = True
        finally:
            if ok and cache:
                self._cache_tokens = (ids + generated)[: cache[0].offset]
            else:  # an error mid-way may leave the cache half-updated
                self._cache, self._cache_tokens = None, []
            busy.__exit__(None, None, None)


class _Busy:
    """Serialises requests; a nested request from the same thread is an error, not a deadlock."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def __enter__(self) -> None:
        engine = self.engine
        if engine._owner == threading.get_ident():
            raise LmxError("this thread already has a generation running on the engine; finish or close it first")
        engine._lock.acquire()
        engine._owner = threading.get_ident()
        if engine._loaded is None:
            engine._owner = None
            engine._lock.release()
            raise EngineClosedError("the engine is closed; load the model again with lmx.load()")

    def __exit__(self, *exc: object) -> None:
        self.engine._owner = None
        self.engine._lock.release()


def _collect(stream: TokenStream) -> Completion:
    logprobs: list[float] = []
    tops: list[Any] = []
    want_top = False
    for token in stream:
        logprobs.append(token.logprob)
        tops.append(token.top_logprobs)
        want_top = want_top or token.top_logprobs is not None
    return Completion(
        text=stream.text,
        tokens=stream.tokens,
        finish_reason=stream.finish_reason or "length",  # type: ignore[arg-type]
        metrics=stream.metrics,
        logprobs=logprobs,
        top_logprobs=tops if want_top else None,
    )


def _ids(value: Any) -> frozenset[int]:
    if value is None:
        return frozenset()
    if isinstance(value, int):
        return frozenset({value})
    return frozenset(int(v) for v in value)


def _flatten(params: Any) -> list[tuple[str, mx.array]]:
    from mlx.utils import tree_flatten

    return tree_flatten(params)


def load(
    model: str | os.PathLike | None = None,
    *,
    device: str | None = None,
    dtype: str = "auto",
    prompt_cache: bool = True,
    adapter: str | os.PathLike | None = None,
    cpu_kernels: bool | None = None,
) -> Engine:
    """Load a model and return an :class:`Engine`.

    Args:
        model: an HF model directory, a ``.gguf`` file, or None for the bundled default
            (Gemma 3 270M).
        device: ``"cpu"`` or ``"gpu"``; default: ``LMX_DEVICE``, else the GPU if MLX has one.
        dtype: ``"auto"`` (float32 on CPU, bfloat16 on GPU), ``"float32"``, ``"bfloat16"``,
            ``"float16"``. Quantized layers stay quantized.
        prompt_cache: reuse the KV cache of the previous request's common prefix.
        adapter: a LoRA adapter directory (``adapters.safetensors`` + ``adapter_config.json``)
            to apply on top of the weights.
        cpu_kernels: run a GGUF model's quantized matrices on lmx's CPU kernels (about 4x fewer
            bytes a token than float32, same logits up to summation order). None: on the CPU
            when built and ``LMX_CPU_KERNELS`` is not 0; False: MLX's float32 path; True: required.

    Raises:
        ModelNotFoundError, UnsupportedModelError, ConfigError, WeightsError,
        TokenizerError, InvalidOptionError.
    """
    choose_device(device)
    loaded = load_model(model, dtype=dtype, cpu_kernels=cpu_kernels)
    if adapter is not None:
        from lmx.train.lora import load_adapter

        load_adapter(loaded.model, adapter)
    return Engine(loaded, prompt_cache=prompt_cache)

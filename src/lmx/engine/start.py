""":func:`load`: a model (with its draft model, adapter and process group) as a running :class:`Engine`."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import mlx.core as mx

from lmx.engine.core import DEFAULT_PREFIX_CACHE_BYTES, Engine
from lmx.errors import InvalidOptionError
from lmx.generate.options import GenerationOptions
from lmx.loading import load_model
from lmx.models.cache import kv_quant
from lmx.runtime import settings
from lmx.runtime.device import choose_device

logger = logging.getLogger(__name__)


def load(
    model: str | os.PathLike | None = None,
    *,
    device: str | None = None,
    dtype: str = "auto",
    prompt_cache: bool = True,
    adapter: str | os.PathLike | None = None,
    cpu_kernels: bool | None = None,
    gguf_on_device: str | None = None,
    max_batch: int = 32,
    prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
    draft_model: str | os.PathLike | None = None,
    speculative: str | None = None,
    tensor_parallel: int | None = None,
    distributed_backend: str = "any",
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    pipeline_parallel: int | None = None,
) -> Engine:
    """Load a model and return an :class:`Engine`.

    Args:
        model: an HF model directory, a ``.gguf`` file, or None for the bundled default
            (Gemma 3 270M).
        device: ``"cpu"`` or ``"gpu"``; default: ``LMX_DEVICE``, else the GPU if MLX has one.
        dtype: ``"auto"`` (float32 on CPU, bfloat16 on GPU), ``"float32"``, ``"bfloat16"``,
            ``"float16"``. Quantized layers stay quantized.
        prompt_cache: keep earlier prompts' keys/values (up to ``prefix_cache_bytes``) and
            reuse the longest prefix a new request shares with one of them.
        adapter: a LoRA adapter directory (``adapters.safetensors`` + ``adapter_config.json``)
            to apply: it is loaded under its directory's name (see :meth:`Engine.load_adapter`)
            and becomes the default ``adapter`` option, so every request uses it unless it
            passes ``adapter=None``.
        cpu_kernels: run a GGUF model's quantized matrices on lmx's CPU kernels (about 4x fewer
            bytes a token than float32, same logits up to summation order). None: on the CPU
            when built and ``LMX_CPU_KERNELS`` is not 0; False: MLX's float32 path; True: required.
        gguf_on_device: where the CPU kernels do not run a GGUF model, ``"quantized"`` (MLX affine
            quantized layers holding the file's values) or ``"float"`` (dequantized). None:
            ``LMX_GGUF_ON_DEVICE`` (``auto``: float; quantized is opt-in).
        max_batch: the most requests decoded together (continuous batching).
        prefix_cache_bytes: the prefix cache's bound in bytes.
        draft_model: a small model of the same vocabulary (an HF directory or ``.gguf`` file) that
            drafts tokens for speculative decoding (Gemma 3 270M for a larger Gemma 3, Qwen 3 0.6B
            for Qwen 3 8B); it is loaded as ``model`` is, and ``speculative`` defaults to
            ``"draft-model"``.
        speculative: the default ``speculative`` option of requests: None, ``"prompt-lookup"``
            or ``"draft-model"`` (see :class:`lmx.GenerationOptions`); a request may override it.
        tensor_parallel: split the model over this many processes, started together by
            ``mlx.launch`` (each calls ``load`` with the same arguments and runs the same requests;
            see the README). Float weights only (a GGUF file is dequantized); dense Gemma 3 and
            Qwen 3. None: this process alone.
        distributed_backend: the ``mlx.distributed`` backend to join with ``tensor_parallel``:
            ``any`` (the one ``mlx.launch`` set up), ``ring``, ``mpi`` or ``nccl``; also for
            ``pipeline_parallel``.
        pipeline_parallel: split the model's decoder layers over this many processes, started
            together as for ``tensor_parallel`` (rank 0 also holds the embedding and LM head, the
            last rank the final norm; see :mod:`lmx.models.pipeline_parallel`). For fitting a
            model across hosts, not for speed. Float weights only; dense Gemma 3 and Qwen 3; not
            with ``tensor_parallel``, ``adapter``, ``draft_model``; no prefix cache.
        kv_bits: keep the KV cache quantized to 8 or 4 bits (about 3.5x or 6x less memory than
            float32 keys and values; attention reads them quantized). None: ``LMX_KV_BITS``
            (unset: off, keys and values in the model's dtype).
        kv_group_size: elements of a head per scale and bias of the quantized keys and values
            (32, 64 or 128; it must divide the model's head_dim).

    Raises:
        ModelNotFoundError, UnsupportedModelError, ConfigError, WeightsError,
        TokenizerError, InvalidOptionError, DraftModelError (a draft model of another vocabulary).
    """
    if kv_bits is None:
        kv_bits = settings.LMX_KV_BITS.get()
    kv_quant(kv_bits, kv_group_size)  # a bad value fails before the model loads
    choose_device(device)
    defaults = GenerationOptions(speculative=speculative or ("draft-model" if draft_model is not None else None))
    if defaults.speculative == "draft-model" and draft_model is None:
        raise InvalidOptionError(
            "speculative='draft-model' needs draft_model=PATH (a small model of the same vocabulary)"
        )
    group = None
    if tensor_parallel is not None and pipeline_parallel is not None:
        raise InvalidOptionError(
            f"tensor_parallel={tensor_parallel} and pipeline_parallel={pipeline_parallel} cannot be combined; "
            "choose one of them"
        )
    split = "tensor_parallel" if tensor_parallel is not None else "pipeline_parallel"
    size = tensor_parallel if tensor_parallel is not None else pipeline_parallel
    if size is not None:
        if adapter is not None:
            raise InvalidOptionError(f"adapter= is not supported with {split} (LoRA on split layers)")
        if draft_model is not None:
            raise InvalidOptionError(f"draft_model= is not supported with {split} (rows decode plainly)")
        if kv_quant(kv_bits, kv_group_size) is not None:
            raise InvalidOptionError(f"kv_bits={kv_bits} is not supported with {split} (float KV caches only)")
        group = join_group(size, distributed_backend, split)
        if pipeline_parallel is not None and group.size > 1:
            group = dataclasses.replace(group, split="pipeline-parallel")
            prompt_cache = False  # each rank's caches differ in size: no evictions that could tell the ranks apart
    loaded = load_model(model, dtype=dtype, cpu_kernels=cpu_kernels, gguf_on_device=gguf_on_device, group=group)
    draft = None
    if draft_model is not None:
        draft = load_model(draft_model, dtype=dtype, cpu_kernels=cpu_kernels, gguf_on_device=gguf_on_device)
    engine = Engine(
        loaded,
        prompt_cache=prompt_cache,
        max_batch=max_batch,
        prefix_cache_bytes=prefix_cache_bytes,
        draft=draft,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
    )
    engine.default_options = defaults
    if adapter is not None:
        try:
            name = engine.load_adapter(adapter)
        except BaseException:
            engine.close()
            raise
        engine.default_options = dataclasses.replace(engine.default_options, adapter=name)
    return engine


def join_group(size: int, backend: str, name: str = "tensor_parallel") -> Any:
    """The group of ``size`` processes this one was launched in, with one random state on every rank.

    Raises:
        InvalidOptionError: ``size`` < 1, or this process is not one of ``size`` launched together.
    """
    from lmx.runtime.distributed import join_group

    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InvalidOptionError(f"{name} must be an integer >= 1, got {size!r}")
    group = join_group(backend)
    if group.size != size:
        raise InvalidOptionError(
            f"{name}={size}, but this process was started in a group of {group.size}: start {size} "
            f"processes together with mlx.launch (e.g. mlx.launch -n {size} --backend ring -- ...; see the README)"
        )
    if size > 1:
        # rows without a seed draw from MLX's global random state: the same on every rank, so every
        # rank samples the same tokens from the same (all-gathered or all-summed) logits
        mx.random.seed(group.broadcast_int(int.from_bytes(os.urandom(3), "little")))
    return group

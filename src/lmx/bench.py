"""Benchmarks: load time, prefill and decode speed, time to first token, peak memory.

The numbers come from the same step loop the engine runs (:func:`lmx.generate.step.generate_step`,
greedy, one host read of the tokens per step as the engine does), over a random prompt of a
fixed length, so they can be compared across models, devices and dtypes. Models come from a
checkpoint (``model=``) or from a named published config with random weights (``config=``),
which needs no download: a GPU host can benchmark an 8B shape with nothing but the code.

Nothing here prints: :func:`run_benchmark` returns a :class:`BenchResult`.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from lmx.errors import InvalidOptionError
from lmx.generate.sampling import KeySequence, make_sampler
from lmx.generate.step import DecodeState, generate_step
from lmx.models import ARCHITECTURES, BENCH_CONFIGS
from lmx.models.cache import KVQuant, kv_quant
from lmx.runtime.profile import DeviceProfile

logger = logging.getLogger(__name__)


# `--config NAME` shapes, declared by each architecture's module (models/<arch>.py BENCH_CONFIGS).
CONFIGS: dict[str, dict[str, Any]] = BENCH_CONFIGS


@dataclass(frozen=True)
class RunStats:
    """One timed generation.

    Attributes:
        time_to_first_token: seconds from the call to the first token on the host (the prefill).
        prefill_tokens_per_s: prompt tokens (all rows) over ``time_to_first_token``.
        decode_tokens_per_s: tokens after the first (all rows) over the time from the first
            token to the last.
        peak_memory: MLX's peak active bytes during the generation (weights included).
        kv_cache_bytes: bytes the KV caches hold at the end (allocated storage).
    """

    time_to_first_token: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    peak_memory: int
    kv_cache_bytes: int


@dataclass
class BenchResult:
    """What :func:`run_benchmark` measured; the medians over ``runs`` are the headline numbers.

    Attributes:
        model: the checkpoint path or the config name.
        device: ``cpu`` or ``gpu``.
        dtype: the weights' floating dtype(s).
        quantization: bits of quantized weights, or None.
        batch, prompt_tokens, gen_tokens: the shape of each run.
        load_time: seconds to load the checkpoint (or build and initialise a config).
        weights_bytes: bytes held by the model's parameters.
        runs: the timed runs (warm-up excluded).
        kv_bits, kv_group_size: the KV cache's quantization (None: float keys and values).
    """

    model: str
    device: str
    dtype: str
    quantization: int | None
    batch: int
    prompt_tokens: int
    gen_tokens: int
    load_time: float
    weights_bytes: int
    runs: list[RunStats] = field(default_factory=list)
    kv_bits: int | None = None
    kv_group_size: int | None = None

    def _median(self, name: str) -> float:
        return statistics.median(getattr(r, name) for r in self.runs) if self.runs else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self._median("prefill_tokens_per_s")

    @property
    def decode_tokens_per_s(self) -> float:
        return self._median("decode_tokens_per_s")

    @property
    def time_to_first_token(self) -> float:
        return self._median("time_to_first_token")

    @property
    def peak_memory(self) -> int:
        return max((r.peak_memory for r in self.runs), default=0)

    @property
    def kv_cache_bytes(self) -> int:
        return max((r.kv_cache_bytes for r in self.runs), default=0)

    @property
    def memory_overhead(self) -> float:
        """Peak over (weights + KV cache), minus 1: 0.10 means 10% above what must be held."""
        need = self.weights_bytes + self.kv_cache_bytes
        return self.peak_memory / need - 1.0 if need else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The result as plain JSON-ready data: medians first, every run after."""
        return {
            "model": self.model,
            "device": self.device,
            "dtype": self.dtype,
            "quantization": self.quantization,
            "kv_bits": self.kv_bits,
            "kv_group_size": self.kv_group_size,
            "batch": self.batch,
            "prompt_tokens": self.prompt_tokens,
            "gen_tokens": self.gen_tokens,
            "repeat": len(self.runs),
            "load_time_s": self.load_time,
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "time_to_first_token_s": self.time_to_first_token,
            "peak_memory_bytes": self.peak_memory,
            "weights_bytes": self.weights_bytes,
            "kv_cache_bytes": self.kv_cache_bytes,
            "memory_overhead": self.memory_overhead,
            "runs": [asdict(r) for r in self.runs],
        }


def config_for(name: str, num_layers: int | None = None) -> dict[str, Any]:
    """Return a copy of the named config, optionally cut to ``num_layers`` layers.

    Raises:
        InvalidOptionError: an unknown name or a layer count < 1.
    """
    if name not in CONFIGS:
        raise InvalidOptionError(f"config must be one of {', '.join(CONFIGS)}, got {name!r}")
    config = copy.deepcopy(CONFIGS[name])
    if num_layers is not None:
        if num_layers < 1:
            raise InvalidOptionError(f"num_layers must be >= 1, got {num_layers}")
        config["num_hidden_layers"] = num_layers
    return config


def random_weights(model: nn.Module, dtype: mx.Dtype, seed: int = 0) -> None:
    """Give ``model`` random weights of ``dtype`` quickly.

    Each parameter is 64 random rows tiled to its full shape: the shapes, dtypes and bytes
    moved are those of the real model, at seconds instead of minutes for an 8B model.
    Norm weights are drawn near their neutral value so activations stay finite.
    """
    keys = mx.random.split(mx.random.key(seed), len(tree_flatten(model.parameters())))
    params = []
    for i, (name, p) in enumerate(tree_flatten(model.parameters())):
        rows = p.shape[0]
        base = mx.random.normal((min(rows, 64), *p.shape[1:]), dtype=mx.float32, key=keys[i])
        base = (base * 0.02).astype(dtype)
        if "norm" in name and getattr(model, "args", None) is not None:
            base = base + ARCHITECTURES[model.args.model_type].NEUTRAL_NORM_WEIGHT  # weight or 1 + weight
        tiled = mx.tile(base, (math.ceil(rows / base.shape[0]),) + (1,) * (p.ndim - 1))[:rows]
        params.append((name, tiled))
        mx.eval(tiled)  # one parameter at a time: peak memory stays near the model's size
    model.update(tree_unflatten(params))


@dataclass
class BenchModel:
    """A model as the benchmarks run it: loaded (or built from a config with random weights), set
    up as the loader would (its profile's ops, fused projections), with what the reports name."""

    model: nn.Module
    name: str
    load_time: float
    vocab_size: int
    profile: DeviceProfile
    config: dict[str, Any]  # the model's config (with its quantization, where quantized)


def load_bench_model(
    model: str | os.PathLike | None, config: str | None, dtype: str, num_layers: int | None, quantize: int | None
) -> BenchModel:
    """``model`` (a path, or None: the bundled default) or a ``config`` name's random weights,
    optionally cut to ``num_layers`` and quantized to ``quantize`` bits, on the current device."""
    from lmx.loading import load_model, resolve_dtype
    from lmx.loading.loader import load_profile, profile_ops
    from lmx.models import build_model

    if model is not None and config is not None:
        raise InvalidOptionError("give a model (path) or a config name, not both")
    t0 = time.perf_counter()
    if config is not None:
        cfg = config_for(config, num_layers)
        built = build_model(cfg, f"config {config}")
        random_weights(built, resolve_dtype(dtype))
        name, vocab, model_config = config, int(cfg["vocab_size"]), cfg
        profile = load_profile(dtype)  # as the loader chooses it (random weights are no GGUF file: no kernels)
        built.set_ops(profile_ops(profile))
    else:
        loaded = load_model(model, dtype=dtype)  # None: the bundled default, as lmx.load(None) loads it
        built, name, vocab, profile = loaded.model, loaded.source, int(loaded.config["vocab_size"]), loaded.profile
        model_config = dict(loaded.config)
    if quantize is not None:
        if quantize not in (4, 8):
            raise InvalidOptionError(f"quantize must be 4 or 8 bits, got {quantize}")
        nn.quantize(built, group_size=64, bits=quantize)
        model_config = {**model_config, "quantization": {"group_size": 64, "bits": quantize}}
    mx.eval(built.parameters())
    if profile.fused_projections:  # as the loader does (again after quantizing: the quantized layers)
        built.fuse_projections()
    return BenchModel(built, name, time.perf_counter() - t0, vocab, profile, model_config)


def greedy_stamps(
    model: nn.Module,
    prompt: mx.array,
    n: int,
    *,
    cache: list | None = None,
    prefill_step_size: int | None = None,
    compile: bool | None = None,
    segments: bool | None = None,
    state: DecodeState | None = None,
) -> tuple[float, list[float]]:
    """Greedy-decode ``n`` tokens after ``prompt`` (B, L); the start time and when each token
    was readable on the host (``t_k`` of the definitions in benchmarks/RESULTS.md).
    ``compile`` and ``segments`` choose the decode step, ``state`` the plan and the traces kept
    between calls (see :func:`generate_step`; pass the same ``state`` to every call on a model)."""
    cache = model.make_cache() if cache is None else cache
    t0 = time.perf_counter()
    steps = generate_step(
        model,
        prompt,
        cache,
        make_sampler(0.0),
        KeySequence(0).next,
        prefill_step_size=prefill_step_size,
        compile=compile,
        segments=segments,
        state=state,
    )
    stamps: list[float] = []
    try:
        for token, _ in steps:
            token.tolist()  # the host read the engine makes each step (stop checks, detokenizing)
            stamps.append(time.perf_counter())
            if len(stamps) == n:
                break
    finally:
        steps.close()
    return t0, stamps


def _one_run(
    model: nn.Module,
    prompt: mx.array,
    gen_tokens: int,
    prefill_step_size: int,
    compile: bool,
    state: DecodeState,
    quant: KVQuant | None = None,
) -> RunStats:
    cache = model.make_cache(quant)
    mx.clear_cache()
    mx.reset_peak_memory()
    batch, length = prompt.shape
    t0, stamps = greedy_stamps(
        model,
        prompt,
        gen_tokens,
        cache=cache,
        prefill_step_size=prefill_step_size,
        compile=compile or None,
        state=state,
    )
    ttft = stamps[0] - t0
    decode_time = stamps[-1] - stamps[0]
    decode = batch * (len(stamps) - 1) / decode_time if len(stamps) > 1 and decode_time > 0 else 0.0
    mx.synchronize()
    return RunStats(
        time_to_first_token=ttft,
        prefill_tokens_per_s=batch * length / ttft,
        decode_tokens_per_s=decode,
        peak_memory=mx.get_peak_memory(),
        kv_cache_bytes=sum(c.nbytes for c in cache),
    )


def run_benchmark(
    model: str | os.PathLike | None = None,
    *,
    config: str | None = None,
    prompt_tokens: int = 512,
    gen_tokens: int = 128,
    batch: int = 1,
    repeat: int = 3,
    device: str | None = None,
    dtype: str = "auto",
    num_layers: int | None = None,
    quantize: int | None = None,
    prefill_step_size: int | None = None,
    compile: bool = False,
    seed: int = 0,
    on_run: Callable[[RunStats], None] | None = None,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
) -> BenchResult:
    """Load a model, warm it up, then time ``repeat`` generations of a random prompt.

    Args:
        model: an HF model dir or a ``.gguf`` file (exclusive with ``config``); neither: the bundled
            default model, as :func:`lmx.load` loads it (on the CPU with the kernels, its GGUF file).
        config: a name from :data:`CONFIGS`: random weights of that published shape.
        prompt_tokens: prompt length (random ids) per row.
        gen_tokens: tokens generated per row (greedy; no stop token ends it early).
        batch: rows generated together (decode tok/s counts all rows).
        repeat: timed runs; the result reports their medians.
        device: ``cpu`` or ``gpu`` (default as :func:`lmx.load`).
        dtype: weight dtype as in :func:`lmx.load` (``auto``: float32 on CPU, bfloat16 on GPU).
        num_layers: with ``config``, cut the model to this many layers.
        quantize: with 4 or 8, quantize the linear and embedding layers (group size 64).
        prefill_step_size: prompt chunk size of the step loop (None: 2048 on a GPU, 128 on the CPU).
        compile: decode with the compiled step (see :func:`lmx.generate.step.generate_step`).
        seed: seed of the random prompt.
        on_run: called with each timed run as it finishes (progress reports).
        kv_bits: keep the KV cache quantized to 8 or 4 bits (None: float), ``kv_group_size``
            elements per scale (see :func:`lmx.load`).

    Returns:
        A :class:`BenchResult`.

    Raises:
        InvalidOptionError: a bad option or config name.
        ModelNotFoundError, UnsupportedModelError, ConfigError, WeightsError: from loading.
    """
    from lmx.runtime.device import choose_device, device_name

    for opt, value, low in (("prompt_tokens", prompt_tokens, 1), ("gen_tokens", gen_tokens, 2)):
        if value < low:
            raise InvalidOptionError(f"{opt} must be >= {low}, got {value}")
    for opt, value in (("batch", batch), ("repeat", repeat), ("prefill_step_size", prefill_step_size)):
        if value is not None and value < 1:
            raise InvalidOptionError(f"{opt} must be >= 1, got {value}")
    kv_quant(kv_bits, kv_group_size)  # a bad value fails before the model loads
    choose_device(device)
    loaded = load_bench_model(model, config, dtype, num_layers, quantize)
    quant = kv_quant(kv_bits, kv_group_size, loaded.model.args.head_dim)
    prefill_step_size = prefill_step_size or loaded.profile.prefill_step_size
    state = DecodeState(loaded.model, loaded.profile)
    params = tree_flatten(loaded.model.parameters())
    dtypes = sorted({str(v.dtype).replace("mlx.core.", "") for _, v in params if mx.issubdtype(v.dtype, mx.floating)})
    result = BenchResult(
        model=loaded.name,
        device=device_name(),
        dtype=",".join(dtypes),
        quantization=quantize,
        batch=batch,
        prompt_tokens=prompt_tokens,
        gen_tokens=gen_tokens,
        load_time=loaded.load_time,
        weights_bytes=sum(v.nbytes for _, v in params),
        kv_bits=kv_bits,
        kv_group_size=kv_group_size if kv_bits else None,
    )
    prompt = mx.random.randint(0, loaded.vocab_size, (batch, prompt_tokens), key=mx.random.key(seed))
    # Warm-up: the first call pays for kernel compilation and allocations.
    warm = prompt[:, : min(prompt_tokens, 16)]
    _one_run(loaded.model, warm, min(gen_tokens, 8), prefill_step_size, compile, state, quant)
    for _ in range(repeat):
        stats = _one_run(loaded.model, prompt, gen_tokens, prefill_step_size, compile, state, quant)
        result.runs.append(stats)
        logger.debug("run: %s", stats)
        if on_run is not None:
            on_run(stats)
    return result

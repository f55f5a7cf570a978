"""lmx against mlx-lm on one device, same MLX build, same random weights, interleaved.

For each named config (``lmx.bench.CONFIGS``) one lmx model gets random weights and an
mlx-lm model of the same architecture is given the *same arrays* (no copy), so both read
identical bytes. Then, in rounds whose order rotates, each variant generates from the same
random prompt: lmx as it runs by default, lmx with/without its compiled decode step,
lmx with one of the speed changes undone (to measure it), and mlx-lm's ``generate_step``. Timing is identical for all (see ``workers.py``): the token of
each step is read on the host, decode tok/s = (n - 1) / (t_n - t_1).

Decode steps: ``lmx-plain`` is the eager step as it was before the segmented step (a new
``weight.T`` op per linear layer and call, heads split by reshape + transpose) and before lmx's
CUDA decode attention (MLX's attention, unfused for Gemma's head_dim 256),
``lmx-eager`` today's eager step, ``lmx-seg`` the segmented one
(:mod:`lmx.generate.segments`; lmx's default on a GPU), ``lmx-seg-noattn`` the segmented one
with ``LMX_CUDA_ATTENTION=0`` (:mod:`lmx.kernels.cuda_attention` off), ``lmx-unfused`` with
``LMX_FUSED_PROJECTIONS=0``, ``lmx-thread`` with ``LMX_ENCODE_THREAD=on`` (each step queued by a
thread of its own while the next is built; the default on a CUDA GPU), ``lmx-onethread`` with
``LMX_ENCODE_THREAD=off`` (build and queue on one thread, the default before), ``lmx-mlxq`` with
``LMX_CUDA_QUANTIZED=0`` (MLX's quantized products; the same as ``lmx`` without ``--quantize``),
``lmx-q`` with ``LMX_CUDA_QUANTIZED=1`` (lmx's CUDA kernel for quantized matrices of 32 MiB or more; the default since 2026-12-07),
``lmx-q16`` for those of 16 MiB or more, ``lmx-qall`` for every quantized product it takes,
``lmx-dense`` with ``LMX_CUDA_DENSE=1`` (lmx's CUDA kernel for the float products), ``lmx-attn-all``
with lmx's attention kernel for every head dim (also those MLX fuses: Qwen 3's 128, which MLX runs
by cuDNN over a cache of 256+ keys), ``lmx-dense-attn`` both, ``lmx-strided`` with the attention
kernel's strided loop only (one key a warp at a time: the kernel before its tiled loop), ``lmx-tiled``
with its tiled loop for any number of keys (by default from ``TILED_MIN_KEYS``), ``lmx-split`` with
long key ranges split over blocks (``SPLIT_KEYS``, off by default),
``lmx-attn-all-strided`` both of the last. ``--check-steps N`` first checks
that every lmx variant's greedy tokens equal ``lmx-plain``'s over N steps;
``--profile-steps N`` splits a step's wall time into building its graph (Python), queueing
it (``mx.async_eval``) and waiting for the previous token; ``--memory-probe`` measures peak
memory above the weights after prefill and during decode.

Usage (GPU host)::

    PYTHONPATH=src python3 benchmarks/gpu_vs_mlx_lm.py --configs gemma3-270m,gemma3-1b,qwen3-0.6b,qwen3-8b \\
        --rounds 5 --json $OUT/gpu.json

Smoke test here (CPU, tiny shapes)::

    .venv/bin/python benchmarks/gpu_vs_mlx_lm.py --configs tiny-gemma3,tiny-qwen3 --device cpu --rounds 2
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import gc
import json
import platform
import re
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import lmx.runtime  # noqa: E402, F401  # isort: skip  (first: BLAS set-up before mlx.core)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from lmx.bench import config_for, greedy_stamps, random_weights  # noqa: E402
from lmx.bench_mlx_lm import copy_bandwidth, mlx_lm_twin  # noqa: E402
from lmx.generate.sampling import KeySequence, make_sampler  # noqa: E402
from lmx.generate.step import DecodeState, generate_step, prefill  # noqa: E402
from lmx.kernels import cuda_attention, cuda_dense, cuda_quantized  # noqa: E402
from lmx.loading import resolve_dtype  # noqa: E402
from lmx.loading.loader import load_profile, profile_ops  # noqa: E402
from lmx.models import build_model  # noqa: E402
from lmx.runtime.ops import MLX_OPS  # noqa: E402


def quantized_from(min_bytes: int) -> SimpleNamespace:
    """lmx's CUDA product for quantized matrices of ``min_bytes`` or more (``lmx-q``, as
    LMX_CUDA_QUANTIZED=1 sets it, takes ``cuda_quantized.MIN_WEIGHT_BYTES``)."""

    def wanted(x: mx.array, w: mx.array, *rest: Any) -> bool:
        return w.nbytes >= min_bytes and cuda_quantized.supported(x, w, *rest)

    return SimpleNamespace(wanted=wanted, decode_product=cuda_quantized.decode_product)


# Each model's DecodeState (its load profile's plan and the traces made for it), as the engine
# keeps one per loaded model; keyed by id (MLX modules are dicts: not hashable).
STATES: dict[int, DecodeState] = {}
# lmx with one of its CUDA kernels switched: variant -> (the CudaOps attribute, its value; None: off)
KERNEL_SWITCH = {
    "lmx-mlxq": ("quantized", None),
    "lmx-q": ("quantized", cuda_quantized),
    "lmx-q16": ("quantized", quantized_from(16 << 20)),  # Qwen 3 8B's down (27 MiB) too
    "lmx-qall": ("quantized", quantized_from(0)),
    "lmx-dense": ("dense", cuda_dense),
    "lmx-dense-attn": ("dense", cuda_dense),
}
# lmx with its attention kernel for every head dim it takes, MLX's fused ones included
ATTENTION_ALL = {"lmx-attn-all", "lmx-dense-attn", "lmx-attn-all-strided"}
# lmx with its attention kernel's strided loop only (one key a warp at a time, as before the tiled loop)
STRIDED_ATTENTION = {"lmx-strided", "lmx-attn-all-strided"}
# variants whose patches change what a segmented step traces: each keeps its own DecodeState (traces)
OWN_TRACES: dict[str, dict[int, DecodeState]] = {
    v: {} for v in ("lmx-unfused", "lmx-thread", "lmx-onethread", *KERNEL_SWITCH, *ATTENTION_ALL, *STRIDED_ATTENTION)
}
THREAD = {"lmx-thread": True, "lmx-onethread": False}  # variants that set LMX_ENCODE_THREAD


def prepare(model: nn.Module, dtype: str) -> DecodeState:
    """Give ``model`` the profile the loader would choose here (its ops, its step plan, its
    fused projections)."""
    profile = load_profile(dtype)
    model.set_ops(profile_ops(profile))
    if profile.fused_projections:
        print(f"fused projections: {model.fuse_projections()} groups", flush=True)
    STATES[id(model)] = DecodeState(model, profile)
    for variant, states in OWN_TRACES.items():
        own = profile.replace(encode_thread=THREAD[variant]) if variant in THREAD else profile
        states[id(model)] = DecodeState(model, own)
    return STATES[id(model)]


def state_for(variant: str, model: nn.Module) -> DecodeState:
    return OWN_TRACES.get(variant, STATES)[id(model)]


def unfused_products() -> Any:
    """lmx before its projections were fused: each q/k/v and gate/up layer runs alone (the same
    weights, as views of the fused arrays)."""
    from lmx.models import base

    return mock.patch.object(
        base, "products", lambda owner, layers, x: [base.product(owner.ops_slot.ops, layer, x) for layer in layers]
    )


def kernel_switch(model: nn.Module, variant: str) -> Any:
    """lmx as loaded with one of its CUDA kernels off (``lmx-mlxq``: ``LMX_CUDA_QUANTIZED=0``, MLX's
    quantized products) or on (``lmx-dense``: ``LMX_CUDA_DENSE=1``, lmx's float products)."""
    attribute, value = KERNEL_SWITCH[variant]
    if getattr(model.ops, attribute, None) is value or not hasattr(model.ops, attribute):
        return contextlib.nullcontext()
    return mock.patch.object(model.ops, attribute, value)


def time_lmx_patched(model: nn.Module, prompt: list[int], n: int, variant: str) -> tuple[float, list[float]]:
    """An lmx variant of :data:`OWN_TRACES`: its patches (``step_context``), its own traces."""
    with step_context(variant, model):
        return greedy_stamps(model, mx.array([prompt]), n, state=state_for(variant, model))


from lmx.runtime.device import choose_device  # noqa: E402


def time_lmx(
    model: nn.Module, prompt: list[int], n: int, compile: bool, segments: bool | None = None
) -> tuple[float, list[float]]:
    return greedy_stamps(model, mx.array([prompt]), n, compile=compile, segments=segments, state=STATES[id(model)])


@contextlib.contextmanager
def plain_lmx() -> Any:
    """lmx's eager step before the segmented step landed: ``nn.Linear``'s ``weight.T`` op on
    every call, and heads split/merged by reshape + transpose even for one position."""
    from lmx.models import base

    def split_heads(x: mx.array, n_heads: int, norm: nn.Module | None = None) -> mx.array:
        batch, length, _ = x.shape
        x = x.reshape(batch, length, n_heads, -1)  # (B, L, n_heads, D)
        return (x if norm is None else norm(x)).transpose(0, 2, 1, 3)  # (B, n_heads, L, D)

    def merge_heads(x: mx.array, ndim: int = 3) -> mx.array:
        assert ndim == 3, "the eager step runs on (B, L, dim)"
        batch, _, length, _ = x.shape
        return x.transpose(0, 2, 1, 3).reshape(batch, length, -1)  # (B, L, n_heads * D)

    with (
        mock.patch.object(base.Linear, "__call__", nn.Linear.__call__),
        mock.patch.object(base, "split_heads", split_heads),
        mock.patch.object(base, "merge_heads", merge_heads),
    ):
        yield


@contextlib.contextmanager
def no_cuda_attention(model: nn.Module) -> Any:
    """lmx as loaded with ``LMX_CUDA_ATTENTION=0``: MLX's ops (attention unfused for head_dim 256)."""
    saved = model.ops
    model.set_ops(MLX_OPS)
    try:
        yield
    finally:
        model.set_ops(saved)


def time_lmx_plain(model: nn.Module, prompt: list[int], n: int) -> tuple[float, list[float]]:
    with plain_lmx(), no_cuda_attention(model):
        return time_lmx(model, prompt, n, False, segments=False)


def raw_cuda_attention() -> Any:
    """lmx's CUDA attention without its gradient wrapper (mx.custom_function) wherever it is called.
    Measured what the wrapper costs (RESULTS.md); since then the segmented step runs the kernel bare
    (``cuda_attention.inference``), so this variant times the same code as ``lmx-seg``."""
    return mock.patch.object(cuda_attention, "decode_attention", cuda_attention._run)


def time_lmx_seg_rawattn(model: nn.Module, prompt: list[int], n: int) -> tuple[float, list[float]]:
    with raw_cuda_attention():
        return time_lmx(model, prompt, n, False, segments=True)


def time_lmx_seg_noattn(model: nn.Module, prompt: list[int], n: int) -> tuple[float, list[float]]:
    with no_cuda_attention(model):
        return time_lmx(model, prompt, n, False, segments=True)


LMX_STEPS = {  # variant -> (plain, segments) for the token check and the profile
    "lmx-plain": (True, False),
    "lmx-eager": (False, False),
    "lmx-seg": (False, True),
    "lmx-seg-noattn": (False, True),
    "lmx": (False, None),
    "lmx-unfused": (False, True),
    "lmx-mlxq": (False, True),
    "lmx-thread": (False, None),
    "lmx-onethread": (False, None),
    "lmx-dense": (False, None),
    "lmx-q": (False, None),
    "lmx-q16": (False, None),
    "lmx-qall": (False, None),
    "lmx-attn-all": (False, None),
    "lmx-strided": (False, None),
    "lmx-tiled": (False, None),
    "lmx-split": (False, None),
    "lmx-attn-all-strided": (False, None),
    "lmx-dense-attn": (False, None),
    "lmx-compiled": (False, False),
}
COMPILED = {"lmx-compiled"}  # variants that decode with the whole step compiled (CompiledDecode)
NO_CUDA_ATTENTION = {"lmx-plain", "lmx-seg-noattn"}  # variants run with LMX_CUDA_ATTENTION=0


def step_context(variant: str, model: nn.Module) -> contextlib.ExitStack:
    """The patches an lmx decode variant runs under (see LMX_STEPS)."""
    stack = contextlib.ExitStack()
    if LMX_STEPS[variant][0]:
        stack.enter_context(plain_lmx())
    if variant in NO_CUDA_ATTENTION:
        stack.enter_context(no_cuda_attention(model))
    if variant == "lmx-unfused":
        stack.enter_context(unfused_products())
    if variant in KERNEL_SWITCH:
        stack.enter_context(kernel_switch(model, variant))
    if variant in ATTENTION_ALL:  # fits() reads the module's set at trace time
        stack.enter_context(mock.patch.object(cuda_attention, "FUSED_HEAD_DIMS", frozenset()))
    if variant in STRIDED_ATTENTION:  # read at each call (the segmented step calls attention eagerly)
        stack.enter_context(mock.patch.object(cuda_attention, "TILED_KEYS", False))
    if variant == "lmx-tiled":
        stack.enter_context(mock.patch.object(cuda_attention, "TILED_MIN_KEYS", 0))
    if variant == "lmx-split":  # off by default until measured
        stack.enter_context(mock.patch.object(cuda_attention, "SPLIT_KEYS", True))
    return stack


def greedy_run(model: nn.Module, prompt: list[int], n: int, variant: str) -> tuple[list[int], mx.array]:
    """``n`` greedy tokens and their log-probabilities (n, V) from one lmx decode variant."""
    _, segments = LMX_STEPS[variant]
    with step_context(variant, model):
        steps = generate_step(
            model,
            mx.array([prompt]),
            model.make_cache(),
            make_sampler(0.0),
            KeySequence(0).next,
            compile=variant in COMPILED,
            segments=segments,
            state=state_for(variant, model),
        )
        tokens, logprobs = [], []
        for token, lp in steps:
            tokens.append(token.item())
            logprobs.append(lp[0])
            if len(tokens) == n:
                break
        steps.close()
        return tokens, mx.stack(logprobs)


def check_tokens(model: nn.Module, prompt: list[int], n: int, variants: list[str]) -> dict[str, Any]:
    """Each lmx variant's first divergence from ``lmx-plain``'s greedy tokens (None: none in n)."""
    ref_tokens, ref_lp = greedy_run(model, prompt, n, "lmx-plain")
    out: dict[str, Any] = {}
    for v in variants:
        if v not in LMX_STEPS or v == "lmx-plain":
            continue
        tokens, lp = greedy_run(model, prompt, n, v)
        diverge = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), None)
        upto = n if diverge is None else diverge + 1
        a, b = lp[:upto], ref_lp[:upto]
        max_diff = mx.max(mx.where(a == b, 0.0, mx.abs(a - b))).item()  # equal infinities: 0
        out[v] = {"steps": n, "first_divergence": diverge, "max_logprob_diff_until_then": max_diff}
    return out


def count_ops(arrays: list[mx.array]) -> dict[str, int]:
    """The primitives of the unevaluated graph behind ``arrays``, by name."""
    with tempfile.NamedTemporaryFile(suffix=".dot") as f:
        mx.export_to_dot(f.name, *arrays)
        text = Path(f.name).read_text()
    return dict(collections.Counter(re.findall(r'label ?= ?"([A-Za-z_]+)', text)))


def profile_steps(model: nn.Module, prompt: list[int], n: int, variant: str) -> dict[str, Any]:
    """Median host times of a decode step as generate_step runs it: build the graph (Python),
    queue it (``mx.async_eval``), wait for the previous token (``item``); ops in one step.

    With the step thread (``lmx-thread``, or ``lmx`` where it is the default) the loop is
    generate_step's threaded one and ``queue`` is the time this thread waits for the encoder to
    finish queueing the step before (the encoder is the bound where it is not ~0), ``wait`` the
    time it waits for the device to give the previous token."""
    _, segments = LMX_STEPS[variant]
    state = state_for(variant, model)
    if segments is None:  # the plan's step, as generate_step takes it (a GPU's: segmented)
        segments = state.plan.decode_mode == "segmented"
    compiled = variant in COMPILED
    encoder = state.encoder() if state.plan.encode_thread else None
    on_stream = (lambda: mx.stream(encoder.stream)) if encoder is not None else contextlib.nullcontext
    with step_context(variant, model):
        cache = model.make_cache()
        plan = state.plan
        layerwise = plan.prefill_mode == "layerwise"
        with on_stream():
            logits = prefill(model, mx.array([prompt]), cache, None, plan.prefill_step_size, layerwise)
            token = mx.argmax(logits, axis=-1)
            mx.eval(token)
        step = state.compiled(cache, False) if compiled else state.segmented() if segments else None

        def decode(tok: mx.array) -> tuple[mx.array, mx.array]:
            with on_stream():
                if step is not None:
                    logits = step(tok, cache)
                else:
                    logits = model.head(model.hidden(tok[:, None], cache))[:, -1, :]
                logits = logits.astype(mx.float32)
                logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
                return mx.argmax(logprobs, axis=-1), logprobs

        nxt, lp = decode(token)  # this step may grow the caches' storage (more ops than a steady one)
        mx.eval(nxt, lp)
        token = out = nxt
        queued = None
        times: dict[str, list[float]] = {"build": [], "queue": [], "wait": [], "step": []}
        ops: dict[str, int] = {}
        for i in range(n):
            t0 = time.perf_counter()
            nxt, lp = decode(token)
            if encoder is not None:
                with on_stream():
                    handed = mx.stop_gradient(nxt)  # read by this thread; the next graph holds nxt
            t1 = time.perf_counter()
            counting = i == n // 2  # a steady step's ops; this step's times are left out
            if counting:
                if queued is not None:
                    queued.wait()  # the graph walked holds the step the encoder may be queueing
                ops = count_ops([nxt, lp])
            if encoder is None:
                mx.async_eval(nxt, lp)
                t2 = time.perf_counter()
                token.item()
                out = nxt
            else:
                if queued is not None:
                    queued.wait()
                t2 = time.perf_counter()
                queued = encoder.submit(nxt, lp, handed)
                out.item()
                out = handed
            t3 = time.perf_counter()
            token = nxt
            for k, dt in (("build", t1 - t0), ("queue", t2 - t1), ("wait", t3 - t2), ("step", t3 - t0)):
                if not counting:
                    times[k].append(dt * 1e6)
        if queued is not None:
            queued.wait()
        mx.eval(token)
        if encoder is not None:
            mx.synchronize(encoder.stream)
    return {
        "median_us": {k: statistics.median(x) for k, x in times.items()},
        "ops_per_step": sum(ops.values()),
        "ops": ops,
        "thread": encoder is not None,
    }


def memory_probe(model: nn.Module, prompt: list[int], n: int) -> dict[str, float]:
    """MiB above the weights (as allocated) after prefill (512-token chunks built whole, or layer by
    layer as lmx does on a GPU, and 256-token chunks built whole; with each prefill's median time
    of 3) and during decode, default step."""
    gc.collect()
    mx.clear_cache()
    mib = 2**20
    out: dict[str, float] = {"active_at_rest_mib": mx.get_active_memory() / mib}
    for step_size, layerwise, key in ((512, False, "512whole"), (512, True, "512"), (256, False, "256whole")):
        times = []
        for _ in range(3):
            cache = model.make_cache()
            base_active = mx.get_active_memory()
            mx.reset_peak_memory()
            t0 = time.perf_counter()
            logits = prefill(model, mx.array([prompt]), cache, step_size=step_size, layerwise=layerwise)
            token = mx.argmax(logits, axis=-1)
            mx.eval(token, [c.state for c in cache])
            times.append(time.perf_counter() - t0)
        out[f"prefill{key}_ms"] = statistics.median(times) * 1e3
        out[f"prefill{key}_peak_over_rest_mib"] = (mx.get_peak_memory() - base_active) / mib
        out[f"prefill{key}_kv_mib"] = sum(c.nbytes for c in cache) / mib
        if key == "512":
            mx.reset_peak_memory()
            after_prefill = mx.get_active_memory()
            steps = generate_step(
                model, token[:, None], cache, make_sampler(0.0), KeySequence(0).next, state=STATES[id(model)]
            )
            for i, (tok, _) in enumerate(steps):
                tok.item()
                if i == n:
                    break
            steps.close()
            out["decode_peak_over_prefill_end_mib"] = (mx.get_peak_memory() - after_prefill) / mib
        del cache, logits, token
        gc.collect()
        mx.clear_cache()
    return out


def time_lmx_boolmask(model: nn.Module, prompt: list[int], n: int) -> tuple[float, list[float]]:
    """lmx before prefill used MLX's "causal" mask: an explicit boolean mask in every layer."""
    from lmx.models.cache import KVCache, RotatingKVCache, build_mask

    def plain(self: KVCache, n_queries: int, pad: mx.array | None = None) -> mx.array | None:
        return build_mask(n_queries, self.offset, self.offset, None, pad)

    def rotating(self: RotatingKVCache, n_queries: int, pad: mx.array | None = None) -> mx.array | None:
        return build_mask(n_queries, min(self.used, n_queries + self.window - 1), self.offset, self.window, pad)

    saved = KVCache.make_mask, RotatingKVCache.make_mask
    KVCache.make_mask, RotatingKVCache.make_mask = plain, rotating  # type: ignore[method-assign]
    try:
        return time_lmx(model, prompt, n, False)
    finally:
        KVCache.make_mask, RotatingKVCache.make_mask = saved  # type: ignore[method-assign]


def time_lmx_norm_add(model: nn.Module, prompt: list[int], n: int) -> tuple[float, list[float]]:
    """lmx before Gemma's RMSNorm kept ``1 + weight``: one more add (kernel) per norm per step."""
    from lmx.models import gemma3_text

    def call(self: gemma3_text.RMSNorm, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, 1.0 + self.weight, self.eps)

    saved = gemma3_text.RMSNorm.__call__
    gemma3_text.RMSNorm.__call__ = call  # type: ignore[method-assign]
    try:
        return time_lmx(model, prompt, n, False)
    finally:
        gemma3_text.RMSNorm.__call__ = saved  # type: ignore[method-assign]


def time_lmx_unfused_act(model: nn.Module, prompt: list[int], n: int) -> tuple[float, list[float]]:
    """lmx before the MLP's gated activation became one compiled kernel: ``act(gate)`` and the
    product ``* up`` as two kernels per layer."""
    from lmx.models import qwen3
    from lmx.runtime.ops import MlxOps

    saved = MlxOps.gelu_tanh_mul, qwen3.swiglu
    MlxOps.gelu_tanh_mul = lambda self, gate, up: nn.gelu_approx(gate) * up
    qwen3.swiglu = lambda gate, up: nn.silu(gate) * up
    try:
        return time_lmx(model, prompt, n, False)
    finally:
        MlxOps.gelu_tanh_mul, qwen3.swiglu = saved


def time_lmx_where(model: nn.Module, prompt: list[int], n: int) -> tuple[float, list[float]]:
    """Fallback of the compiled step for a backend without dynamic ``slice_update``: the
    new key/value is written with an element-wise ``where`` over the whole storage."""
    from lmx.models.cache import DecodeSlot

    def update_and_fetch(self: DecodeSlot, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        here = (mx.arange(self.keys.shape[2]) == self.where.index)[:, None]  # (S, 1)
        self.keys = mx.where(here, keys, self.keys)
        self.values = mx.where(here, values, self.values)
        return self.keys, self.values

    saved = DecodeSlot.update_and_fetch
    DecodeSlot.update_and_fetch = update_and_fetch  # type: ignore[method-assign]
    state = STATES[id(model)]
    STATES[id(model)] = DecodeState(model, state.plan)  # trace anew with the patched slot
    try:
        return time_lmx(model, prompt, n, True)
    finally:
        DecodeSlot.update_and_fetch = saved  # type: ignore[method-assign]
        STATES[id(model)] = state  # the traces made without the patch


def time_mlx_lm(model: nn.Module, prompt: list[int], n: int) -> tuple[float, list[float]]:
    from mlx_lm.generate import generate_step as mlx_lm_step

    start = time.perf_counter()
    stamps = []
    for _token, _ in mlx_lm_step(mx.array(prompt), model, max_tokens=n):
        stamps.append(time.perf_counter())
    return start, stamps


def measure(fn: Any, prompt: list[int], n: int) -> dict[str, float]:
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    start, stamps = fn(prompt, n)
    ttft = stamps[0] - start
    return {
        "time_to_first_token_s": ttft,
        "prefill_tokens_per_s": len(prompt) / ttft,
        "decode_tokens_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
        "peak_memory_bytes": mx.get_peak_memory(),
    }


def run_config(name: str, args: argparse.Namespace, variants: list[str]) -> dict[str, Any]:
    config = config_for(name)
    t0 = time.perf_counter()
    model = build_model(config)
    random_weights(model, resolve_dtype(args.dtype))
    if args.quantize:
        nn.quantize(model, group_size=64, bits=args.quantize)
        config["quantization"] = {"group_size": 64, "bits": args.quantize}
    mx.eval(model.parameters())
    prepare(model, args.dtype)
    init_s = time.perf_counter() - t0
    twin = mlx_lm_twin(config, model) if "mlx-lm" in variants else None
    weights_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    rng = mx.random.randint(
        min(1000, config["vocab_size"] // 2), config["vocab_size"], (args.prompt_tokens,), key=mx.random.key(0)
    ).tolist()
    prompt = [2, *rng[1:]]
    extra: dict[str, Any] = {}
    if args.check_steps:
        extra["check"] = check_tokens(model, prompt, args.check_steps, variants)
        print(f"{name} token check vs lmx-plain: {json.dumps(extra['check'])}", flush=True)
    if args.profile_steps:
        extra["profile"] = {v: profile_steps(model, prompt, args.profile_steps, v) for v in LMX_STEPS if v in variants}
        for v, p in extra["profile"].items():
            us = "  ".join(f"{k} {x:.0f}" for k, x in p["median_us"].items())
            print(f"{name} profile {v}: {us} us/step, {p['ops_per_step']} ops/step", flush=True)
    if args.memory_probe:
        extra["memory"] = memory_probe(model, prompt, args.gen_tokens) | {"weights_mib": weights_bytes / 2**20}
        print(f"{name} memory: {json.dumps(extra['memory'])}", flush=True)
    fns = {
        "lmx": lambda pr, n: time_lmx(model, pr, n, False),
        "lmx-compiled": lambda pr, n: time_lmx(model, pr, n, True),
        "lmx-eager": lambda pr, n: time_lmx(model, pr, n, False, segments=False),
        "lmx-seg": lambda pr, n: time_lmx(model, pr, n, False, segments=True),
        "lmx-seg-noattn": lambda pr, n: time_lmx_seg_noattn(model, pr, n),
        "lmx-seg-rawattn": lambda pr, n: time_lmx_seg_rawattn(model, pr, n),
        "lmx-plain": lambda pr, n: time_lmx_plain(model, pr, n),
        "lmx-norm-add": lambda pr, n: time_lmx_norm_add(model, pr, n),
        "lmx-boolmask": lambda pr, n: time_lmx_boolmask(model, pr, n),
        "lmx-where": lambda pr, n: time_lmx_where(model, pr, n),
        "lmx-unfused-act": lambda pr, n: time_lmx_unfused_act(model, pr, n),
        "lmx-unfused": lambda pr, n: time_lmx_patched(model, pr, n, "lmx-unfused"),
        "lmx-mlxq": lambda pr, n: time_lmx_patched(model, pr, n, "lmx-mlxq"),
        "lmx-thread": lambda pr, n: time_lmx_patched(model, pr, n, "lmx-thread"),
        "lmx-onethread": lambda pr, n: time_lmx_patched(model, pr, n, "lmx-onethread"),
        "lmx-dense": lambda pr, n: time_lmx_patched(model, pr, n, "lmx-dense"),
        "lmx-q": lambda pr, n: time_lmx_patched(model, pr, n, "lmx-q"),
        "lmx-q16": lambda pr, n: time_lmx_patched(model, pr, n, "lmx-q16"),
        "lmx-qall": lambda pr, n: time_lmx_patched(model, pr, n, "lmx-qall"),
        "lmx-attn-all": lambda pr, n: time_lmx_patched(model, pr, n, "lmx-attn-all"),
        "lmx-strided": lambda pr, n: time_lmx_patched(model, pr, n, "lmx-strided"),
        "lmx-tiled": lambda pr, n: time_lmx_patched(model, pr, n, "lmx-tiled"),
        "lmx-split": lambda pr, n: time_lmx_patched(model, pr, n, "lmx-split"),
        "lmx-attn-all-strided": lambda pr, n: time_lmx_patched(model, pr, n, "lmx-attn-all-strided"),
        "lmx-dense-attn": lambda pr, n: time_lmx_patched(model, pr, n, "lmx-dense-attn"),
        "mlx-lm": lambda pr, n: time_mlx_lm(twin, pr, n),
    }
    errors: dict[str, str] = {}
    todo = list(variants)
    for v in todo:  # warm-up: kernels, compiled graphs, allocations
        try:
            measure(fns[v], prompt[:32], 8)
            measure(fns[v], prompt, 8)
        except Exception:  # a failing variant must not cost the others their measurements
            errors[v] = traceback.format_exc()
            print(f"{name} {v} failed:\n{errors[v]}", flush=True)
            if v == "lmx-compiled" and "lmx-where" not in todo:
                todo.append("lmx-where")
    ok = [v for v in todo if v not in errors]
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in ok}
    for r in range(args.rounds):
        for v in ok[r % len(ok) :] + ok[: r % len(ok)]:
            runs[v].append(measure(fns[v], prompt, args.gen_tokens))
    med = {
        v: {k: statistics.median(x[k] for x in runs[v]) for k in runs[v][0]}
        | {"peak_memory_bytes": max(x["peak_memory_bytes"] for x in runs[v])}
        for v in ok
    }
    line = "  ".join(
        f"{v} dec {med[v]['decode_tokens_per_s']:.1f} pre {med[v]['prefill_tokens_per_s']:.0f}"
        f" peak {med[v]['peak_memory_bytes'] / 2**30:.2f}G"
        for v in ok
    )
    print(f"{name} (weights {weights_bytes / 2**30:.2f} GiB): {line}", flush=True)
    return {"weights_bytes": weights_bytes, "init_s": init_s, "median": med, "runs": runs, "errors": errors} | extra


def report(results: dict[str, Any]) -> None:
    bw = results.get("copy_bandwidth_bytes_per_s")
    if bw:
        print(f"copy bandwidth {bw / 1e9:.0f} GB/s; roofline = bandwidth / weight bytes per decoded token")
    print(
        f"\n{'config':13} {'variant':14} {'decode':>8} {'prefill':>9} {'TTFT ms':>8} {'peak GiB':>8}  vs mlx-lm: decode prefill"
    )
    for name, res in results["configs"].items():
        if "median" not in res:
            print(f"{name:13} failed: {res['error'].strip().splitlines()[-1]}")
            continue
        base = res["median"].get("mlx-lm")
        for v, m in res["median"].items():
            ratio = ""
            if base:
                ratio = (
                    f"{m['decode_tokens_per_s'] / base['decode_tokens_per_s']:17.2f}x"
                    f" {m['prefill_tokens_per_s'] / base['prefill_tokens_per_s']:6.2f}x"
                )
            roof = ""
            if bw:
                roof = f"  {m['decode_tokens_per_s'] * res['weights_bytes'] / bw:6.1%} of roofline"
            print(
                f"{name:13} {v:14} {m['decode_tokens_per_s']:8.1f} {m['prefill_tokens_per_s']:9.0f}"
                f" {m['time_to_first_token_s'] * 1e3:8.1f} {m['peak_memory_bytes'] / 2**30:8.2f}  {ratio}{roof}"
            )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="gemma3-270m,gemma3-1b,qwen3-0.6b,qwen3-8b")
    p.add_argument(
        "--variants",
        default="lmx,lmx-eager,mlx-lm",
        help="lmx (its default), lmx-unfused (projections not fused), lmx-thread (steps queued on a thread), lmx-onethread (no such thread), lmx-mlxq (MLX's quantized products), lmx-q (lmx's quantized products, LMX_CUDA_QUANTIZED=1), lmx-q16 (for those of 16 MiB+), lmx-qall (for every quantized matrix), lmx-dense (lmx's float products, LMX_CUDA_DENSE=1), lmx-attn-all (lmx's attention kernel for every head dim), lmx-strided (its strided loop only), lmx-tiled (its tiled loop from the first key), lmx-split (keys split over blocks from SPLIT_MIN_KEYS), lmx-attn-all-strided, lmx-dense-attn (both), "
        "lmx-compiled, lmx-eager, lmx-seg, lmx-seg-noattn, lmx-plain, lmx-norm-add, lmx-boolmask, lmx-where, "
        "lmx-unfused-act, mlx-lm",
    )
    p.add_argument("--check-steps", type=int, default=0, help="check greedy tokens against lmx-plain first")
    p.add_argument("--profile-steps", type=int, default=0, help="split a decode step's host time")
    p.add_argument("--memory-probe", action="store_true", help="peak memory over the weights, prefill vs decode")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quantize", type=int, default=None, help="quantize both models to this many bits")
    p.add_argument("--device", default=None, choices=["cpu", "gpu"])
    p.add_argument(
        "--bandwidth", action="store_true", help="measure the copy bandwidth; report decode against its roofline"
    )
    p.add_argument("--json", default=None)
    args = p.parse_args()
    choose_device(args.device)
    try:
        info = {k: v for k, v in mx.device_info().items() if isinstance(v, (str, int, float))}
    except Exception as e:  # device_info differs between backends
        info = {"error": str(e)}
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": platform.platform(),
        "device": str(mx.default_device()),
        "device_info": info,
        "mlx": mx.__version__,
        "command": " ".join(sys.argv),
    }
    print(json.dumps(meta), flush=True)
    variants = [v.strip() for v in args.variants.split(",")]
    results: dict[str, Any] = {"meta": meta, "configs": {}}
    if args.bandwidth:
        results["copy_bandwidth_bytes_per_s"] = copy_bandwidth(2.0)
        print(f"copy bandwidth {results['copy_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s", flush=True)
        gc.collect()
        mx.clear_cache()
    for name in [c.strip() for c in args.configs.split(",")]:
        try:
            results["configs"][name] = run_config(name, args, variants)
        except Exception:  # keep going: one failing config must not cost the others
            traceback.print_exc()
            results["configs"][name] = {"error": traceback.format_exc()}
        gc.collect()
        mx.clear_cache()
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

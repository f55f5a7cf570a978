"""lmx against mlx-lm on one device, same MLX build, same random weights, interleaved.

For each named config (``lmx.bench.CONFIGS``) one lmx model gets random weights and an
mlx-lm model of the same architecture is given the *same arrays* (no copy), so both read
identical bytes. Then, in rounds whose order rotates, each variant generates from the same
random prompt: lmx as it runs by default, lmx with/without its compiled decode step,
lmx with one of the speed changes undone (to measure it), and mlx-lm's ``generate_step``. Timing is identical for all (see ``workers.py``): the token of
each step is read on the host, decode tok/s = (n - 1) / (t_n - t_1).

Usage (GPU host)::

    PYTHONPATH=src python3 benchmarks/gpu_vs_mlx_lm.py --configs gemma3-270m,gemma3-1b,qwen3-0.6b,qwen3-8b \\
        --rounds 5 --json $OUT/gpu.json

Smoke test here (CPU, tiny shapes)::

    .venv/bin/python benchmarks/gpu_vs_mlx_lm.py --configs tiny-gemma3,tiny-qwen3 --device cpu --rounds 2
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import lmx.runtime  # noqa: E402, F401  # isort: skip  (first: BLAS set-up before mlx.core)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from lmx.bench import config_for, greedy_stamps, random_weights  # noqa: E402
from lmx.loader import resolve_dtype  # noqa: E402
from lmx.models import build_model  # noqa: E402
from lmx.runtime.device import choose_device  # noqa: E402


def mlx_lm_twin(config: dict[str, Any], model: nn.Module) -> nn.Module:
    """An mlx-lm model of ``config`` holding the same weight arrays as the lmx ``model``."""
    import importlib

    arch = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    twin = arch.Model(arch.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    if config.get("quantization"):
        q = config["quantization"]
        nn.quantize(twin, group_size=q["group_size"], bits=q["bits"])
    weights = twin.sanitize(weights)
    twin.load_weights(list(weights.items()), strict=True)
    mx.eval(twin.parameters())
    return twin


def time_lmx(model: nn.Module, prompt: list[int], n: int, compile: bool) -> tuple[float, list[float]]:
    return greedy_stamps(model, mx.array([prompt]), n, compile=compile)


def time_lmx_boolmask(model: nn.Module, prompt: list[int], n: int) -> tuple[float, list[float]]:
    """lmx before prefill used MLX's "causal" mask: an explicit boolean mask in every layer."""
    from lmx.models.cache import KVCache, RotatingKVCache, build_mask

    def plain(self: KVCache, n_queries: int, pad: mx.array | None = None) -> mx.array | None:
        return build_mask(n_queries, self.offset, self.offset, None, pad)

    def rotating(self: RotatingKVCache, n_queries: int, pad: mx.array | None = None) -> mx.array | None:
        return build_mask(n_queries, min(self._used, n_queries + self.window - 1), self.offset, self.window, pad)

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
    from lmx.models import gemma3_text, qwen3

    saved = gemma3_text.geglu_tanh, qwen3.swiglu
    gemma3_text.geglu_tanh = lambda gate, up: nn.gelu_approx(gate) * up
    qwen3.swiglu = lambda gate, up: nn.silu(gate) * up
    try:
        return time_lmx(model, prompt, n, False)
    finally:
        gemma3_text.geglu_tanh, qwen3.swiglu = saved


def time_lmx_where(model: nn.Module, prompt: list[int], n: int) -> tuple[float, list[float]]:
    """Fallback of the compiled step for a backend without dynamic ``slice_update``: the
    new key/value is written with an element-wise ``where`` over the whole storage."""
    from lmx.models.cache import DecodeSlot

    def update_and_fetch(self: DecodeSlot, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        here = (mx.arange(self.keys.shape[2]) == self.index)[:, None]  # (S, 1)
        self.keys = mx.where(here, keys, self.keys)
        self.values = mx.where(here, values, self.values)
        return self.keys, self.values

    saved = DecodeSlot.update_and_fetch
    DecodeSlot.update_and_fetch = update_and_fetch  # type: ignore[method-assign]
    object.__setattr__(model, "_lmx_decoders", None)  # trace anew with the patched slot
    try:
        return time_lmx(model, prompt, n, True)
    finally:
        DecodeSlot.update_and_fetch = saved  # type: ignore[method-assign]
        object.__setattr__(model, "_lmx_decoders", None)


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
    init_s = time.perf_counter() - t0
    twin = mlx_lm_twin(config, model) if "mlx-lm" in variants else None
    weights_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    rng = mx.random.randint(1000, config["vocab_size"], (args.prompt_tokens,), key=mx.random.key(0)).tolist()
    prompt = [2, *rng[1:]]
    fns = {
        "lmx": lambda pr, n: time_lmx(model, pr, n, False),
        "lmx-compiled": lambda pr, n: time_lmx(model, pr, n, True),
        "lmx-eager": lambda pr, n: time_lmx(model, pr, n, False),
        "lmx-norm-add": lambda pr, n: time_lmx_norm_add(model, pr, n),
        "lmx-boolmask": lambda pr, n: time_lmx_boolmask(model, pr, n),
        "lmx-where": lambda pr, n: time_lmx_where(model, pr, n),
        "lmx-unfused-act": lambda pr, n: time_lmx_unfused_act(model, pr, n),
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
    return {"weights_bytes": weights_bytes, "init_s": init_s, "median": med, "runs": runs, "errors": errors}


def report(results: dict[str, Any]) -> None:
    print(
        f"\n{'config':13} {'variant':12} {'decode':>8} {'prefill':>9} {'TTFT ms':>8} {'peak GiB':>8}  vs mlx-lm: decode prefill"
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
            print(
                f"{name:13} {v:12} {m['decode_tokens_per_s']:8.1f} {m['prefill_tokens_per_s']:9.0f}"
                f" {m['time_to_first_token_s'] * 1e3:8.1f} {m['peak_memory_bytes'] / 2**30:8.2f}  {ratio}"
            )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="gemma3-270m,gemma3-1b,qwen3-0.6b,qwen3-8b")
    p.add_argument(
        "--variants",
        default="lmx,lmx-eager,mlx-lm",
        help="lmx (its default), lmx-compiled, lmx-eager, lmx-norm-add, lmx-boolmask, lmx-where, lmx-unfused-act, mlx-lm",
    )
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quantize", type=int, default=None, help="quantize both models to this many bits")
    p.add_argument("--device", default=None, choices=["cpu", "gpu"])
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

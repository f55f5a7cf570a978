"""Long-prompt prefill on one device: lmx at several chunk sizes against mlx-lm, same weights.

Why lmx's 8k-token prefill trails mlx-lm's on a GPU (issue 17 part 6): lmx prefills in chunks
of the profile's ``prefill_step_size`` (512 on a GPU) and waits for each chunk's caches before
building the next; mlx-lm prefills in chunks of 2048. This times the first token of one long
prompt, interleaved, for each lmx chunk size (``--steps``), with the chunk-end wait as lmx does it
(``sync``) and without it (``async``: the next chunk's graph is built while the GPU still runs
the last one), and for mlx-lm at its default and at 512. Peak memory above the weights is
reported for each (the price of a bigger chunk).

    PYTHONPATH=src python3 benchmarks/gpu_prefill_chunks.py --configs gemma3-270m,gemma3-1b \\
        --prompt-tokens 8192 --rounds 3 --json $OUT/prefill_chunks.json

Smoke test here (CPU, tiny shapes)::

    .venv/bin/python benchmarks/gpu_prefill_chunks.py --configs tiny-gemma3 --device cpu \\
        --prompt-tokens 300 --steps 64,128 --rounds 1
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import gpu_vs_mlx_lm as g  # noqa: E402  # isort: skip  (sets up lmx's path and BLAS first)
import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from lmx.bench import config_for, random_weights  # noqa: E402
from lmx.loading import resolve_dtype  # noqa: E402
from lmx.models import build_model  # noqa: E402


def lmx_prefill(model: Any, prompt: list[int], step: int, wait: bool, layerwise: bool) -> mx.array:
    """``lmx.generate.step.prefill``'s loop, with or without its wait at each chunk's end."""
    cache = model.make_cache()
    tokens = mx.array([prompt])
    each_layer = mx.async_eval if layerwise else None
    while tokens.shape[1] > step:
        model.hidden(tokens[:, :step], cache, None, each_layer)
        states = [c.state for c in cache]
        mx.eval(states) if wait else mx.async_eval(states)
        tokens = tokens[:, step:]
    h = model.hidden(tokens, cache, None, each_layer)
    token = mx.argmax(model.head(h[:, -1:, :])[:, 0, :], axis=-1)
    mx.eval(token)
    return token


def mlx_lm_prefill(twin: Any, prompt: list[int], step: int | None) -> mx.array:
    from mlx_lm.generate import generate_step

    kwargs = {"prefill_step_size": step} if step else {}
    token, _ = next(generate_step(mx.array(prompt), twin, max_tokens=1, **kwargs))
    return mx.array(token)


def timed(fn: Any) -> dict[str, float]:
    gc.collect()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    t = time.perf_counter()
    token = fn()
    seconds = time.perf_counter() - t
    return {
        "ms": seconds * 1e3,
        "peak_over_weights_mib": (mx.get_peak_memory() - base) / 2**20,
        "token": int(token.item()),
    }


def run_config(name: str, args: argparse.Namespace) -> dict[str, Any]:
    config = config_for(name)
    model = build_model(config)
    random_weights(model, resolve_dtype(args.dtype))
    mx.eval(model.parameters())
    state = g.prepare(model, args.dtype)
    layerwise = state.plan.prefill_mode == "layerwise"
    twin = g.mlx_lm_twin(config, model) if not args.no_mlx_lm else None
    vocab = config["vocab_size"]
    ids = mx.random.randint(min(1000, vocab // 2), vocab, (args.prompt_tokens,), key=mx.random.key(0)).tolist()
    prompt = [2, *ids[1:]]
    fns: dict[str, Any] = {}
    for step in (int(s) for s in args.steps.split(",")):
        fns[f"lmx-{step}-sync"] = lambda s=step: lmx_prefill(model, prompt, s, True, layerwise)
        fns[f"lmx-{step}-async"] = lambda s=step: lmx_prefill(model, prompt, s, False, layerwise)
    if twin is not None:
        fns["mlx-lm"] = lambda: mlx_lm_prefill(twin, prompt, None)
        fns["mlx-lm-512"] = lambda: mlx_lm_prefill(twin, prompt, 512)
    names = list(fns)
    for v in names:  # warm-up: kernels and allocations of each shape
        timed(fns[v])
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in names}
    for r in range(args.rounds):
        for v in names[r % len(names) :] + names[: r % len(names)]:
            runs[v].append(timed(fns[v]))
    med = {
        v: {
            "ms": statistics.median(x["ms"] for x in runs[v]),
            "prefill_tokens_per_s": len(prompt) / (statistics.median(x["ms"] for x in runs[v]) / 1e3),
            "peak_over_weights_mib": max(x["peak_over_weights_mib"] for x in runs[v]),
            "tokens": sorted({x["token"] for x in runs[v]}),
        }
        for v in names
    }
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    for v in names:
        m = med[v]
        print(
            f"{name} {v:16} {m['ms']:8.1f} ms {m['prefill_tokens_per_s']:9.0f} tok/s"
            f" peak +{m['peak_over_weights_mib']:7.1f} MiB  first token {m['tokens']}",
            flush=True,
        )
    return {"weights_bytes": weights, "layerwise": layerwise, "median": med, "runs": runs}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="gemma3-270m,gemma3-1b")
    p.add_argument("--prompt-tokens", type=int, default=8192)
    p.add_argument("--steps", default="512,1024,2048,4096")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default=None, choices=["cpu", "gpu"])
    p.add_argument("--no-mlx-lm", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.device:
        mx.set_default_device(mx.cpu if args.device == "cpu" else mx.gpu)
    results = {"device": str(mx.default_device()), "args": vars(args), "configs": {}}
    for name in args.configs.split(","):
        results["configs"][name] = run_config(name, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

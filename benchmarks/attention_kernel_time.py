"""Time lmx's one-query CUDA attention kernel per call: its tiled loop, the same with the keys split
over blocks (two kernels), its strided loop, and MLX's own.

Each measurement queues a chain of ``--calls`` attention calls (each call's output is the next
call's query, so they run one after another, as a decode step's layers do) and evaluates it once;
the time per call is then the larger of what queueing a call costs the host and what running it
costs the device. Shapes are decode steps' after a 512-token prompt (640 keys) and at 8,192 keys:
Gemma 3 270M / 1B (4 query heads, 1 key-value head, head dim 256), Qwen 3 0.6B (16/8, 128) and
Qwen 3 8B (32/8, 128), bf16. Keys and values are a prefix view of a larger storage, as a cache
returns them. ``mlx`` is ``mx.fast.scaled_dot_product_attention`` (a fused kernel for head dim
128; separate ops for 256).

    python benchmarks/attention_kernel_time.py --json out.json   # a CUDA GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import lmx.runtime  # noqa: F401  # isort: skip  (first: BLAS set-up before mlx.core)
import mlx.core as mx

from lmx.kernels import cuda_attention

SHAPES = {  # name: (query heads, key-value heads, head dim)
    "gemma3-270m/1b": (4, 1, 256),
    "qwen3-0.6b": (16, 8, 128),
    "qwen3-8b": (32, 8, 128),
}


def chain(way: str, q: mx.array, k: mx.array, v: mx.array, calls: int) -> mx.array:
    scale = q.shape[-1] ** -0.5
    # the tiled loop from the first key (TILED_MIN_KEYS = 0 in main), the split kernels too for "split"
    cuda_attention.TILED_KEYS = way in ("tiled", "split")
    cuda_attention.SPLIT_KEYS = way == "split"
    for _ in range(calls):
        if way == "mlx":
            q = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
        else:
            q = cuda_attention._run(q, k, v, scale)
    return q


def time_way(way: str, heads: tuple[int, int, int], keys: int, calls: int, rounds: int) -> float:
    n_q, n_kv, d = heads
    storage = mx.random.normal((2, 1, n_kv, keys + 256, d)).astype(mx.bfloat16)
    k, v = storage[0][:, :, :keys], storage[1][:, :, :keys]  # a cache's prefix view
    q = mx.random.normal((1, n_q, 1, d)).astype(mx.bfloat16)
    mx.eval(storage, q)
    mx.eval(chain(way, q, k, v, 4))  # compile and warm
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        mx.eval(chain(way, q, k, v, calls))
        times.append((time.perf_counter() - t) / calls * 1e6)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keys", default="640,8192")
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    rows = []
    saved = (cuda_attention.TILED_MIN_KEYS, cuda_attention.SPLIT_MIN_KEYS)
    cuda_attention.TILED_MIN_KEYS = cuda_attention.SPLIT_MIN_KEYS = 0
    try:
        with cuda_attention.inference():
            for name, heads in SHAPES.items():
                for keys in (int(n) for n in args.keys.split(",")):
                    row = {"shape": name, "heads": heads, "keys": keys}
                    for way in ("tiled", "split", "strided", "mlx"):
                        row[f"{way}_us"] = round(time_way(way, heads, keys, args.calls, args.rounds), 2)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        cuda_attention.TILED_KEYS, cuda_attention.SPLIT_KEYS = True, False
        cuda_attention.TILED_MIN_KEYS, cuda_attention.SPLIT_MIN_KEYS = saved
    if args.json:
        Path(args.json).write_text(json.dumps({"mlx": mx.__version__, "calls": args.calls, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One product by concatenated weights against two or three separate products, by the number of rows.

The fused projections (``CausalLM.fuse_projections``, ``LMX_FUSED_PROJECTIONS``) decoded faster on
an H100 but prefilled Qwen 3 8B slower. This times the products alone: for each shape of the
q/k/v and gate/up products of Gemma 3 1B and Qwen 3 8B and each row count M, a chain of
``--chain`` products of ``x`` (M, K) by the fused weights, split, against the separate products,
interleaved, median of ``--rounds`` (microseconds a product).

    python benchmarks/fused_products_check.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import mlx.core as mx

SHAPES = {  # name -> (K, output sizes of the fused layers)
    "gemma3-1b qkv": (1152, [1024, 256, 256]),
    "gemma3-1b gate/up": (1152, [6912, 6912]),
    "qwen3-8b qkv": (4096, [4096, 1024, 1024]),
    "qwen3-8b gate/up": (4096, [12288, 12288]),
}


def timed(fn: Any, x: mx.array, chain: int) -> float:
    outs = []
    mx.synchronize()
    t0 = time.perf_counter()
    for _ in range(chain):
        outs.extend(fn(x))
    mx.eval(outs)
    mx.synchronize()
    return (time.perf_counter() - t0) / chain * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,32,128,512,2048")
    p.add_argument("--chain", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    results: dict[str, Any] = {"device": str(mx.default_device()), "mlx": mx.__version__, "shapes": {}}
    for name, (k, sizes) in SHAPES.items():
        whole = mx.random.normal((sum(sizes), k), key=mx.random.key(0)).astype(mx.bfloat16) * 0.02
        mx.eval(whole)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        parts = [whole[s : s + n] for s, n in zip(starts, sizes)]
        mx.eval(parts)
        whole_t, parts_t = whole.T, [w.T for w in parts]
        mx.eval(whole_t, parts_t)
        splits = starts[1:]

        def fused(x: mx.array, whole_t: mx.array = whole_t, splits: list[int] = splits) -> list[mx.array]:
            return mx.split(x @ whole_t, splits, axis=-1)

        def separate(x: mx.array, parts_t: list[mx.array] = parts_t) -> list[mx.array]:
            return [x @ w for w in parts_t]

        for m in (int(r) for r in args.rows.split(",")):
            x = mx.random.normal((m, k), key=mx.random.key(1)).astype(mx.bfloat16)
            mx.eval(x)
            times: dict[str, list[float]] = {"fused": [], "separate": []}
            for fn in (fused, separate):  # warm-up
                timed(fn, x, 2)
            for r in range(args.rounds):
                order = [("fused", fused), ("separate", separate)]
                for label, fn in order if r % 2 == 0 else order[::-1]:
                    times[label].append(timed(fn, x, args.chain))
            med = {label: statistics.median(t) for label, t in times.items()}
            results["shapes"].setdefault(name, {})[m] = {"median_us": med, "runs_us": times}
            print(
                f"{name:18} M={m:5}  fused {med['fused']:8.1f} us  separate {med['separate']:8.1f} us  "
                f"separate/fused {med['separate'] / med['fused']:.2f}",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

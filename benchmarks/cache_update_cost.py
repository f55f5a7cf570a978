"""What a decode step's cache write costs the host to build: ``update_and_fetch`` of one position,
for a growing and a rotating cache, and the slicing it is made of, both ways of writing the slice.

    python benchmarks/cache_update_cost.py [--steps 2000] [--json out.json]

Each layer of a decode step writes one position of keys and values into its cache and takes the
cached prefix back (two slice updates and two slices). Where a step is bound by the host's work
(a GPU decode step: benchmarks/RESULTS.md), that work is paid in every layer of every step. The
times are the Python call alone (the graph is evaluated outside the timed span, after each call).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import lmx.runtime  # noqa: F401  # isort: skip  (first: BLAS set-up before mlx.core)
import mlx.core as mx

from lmx.models.cache import KVCache, RotatingKVCache

SHAPE = (1, 1, 1, 256)  # one position of Gemma 3 270M's one key/value head


def time_cache(make, steps: int) -> float:
    cache = make()
    prompt = mx.zeros((1, 1, 100, 256), mx.bfloat16)
    cache.update_and_fetch(prompt, prompt)
    mx.eval(cache.keys, cache.values)
    k = mx.zeros(SHAPE, mx.bfloat16)
    spans = []
    for _ in range(steps):
        t0 = time.perf_counter()
        keys, values = cache.update_and_fetch(k, k)
        spans.append(time.perf_counter() - t0)
        mx.eval(keys, values)
    return statistics.median(spans) * 1e6


def time_slices(explicit: bool, steps: int) -> float:
    keys = mx.zeros((1, 1, 4096, 256), mx.bfloat16)
    values = mx.zeros((1, 1, 4096, 256), mx.bfloat16)
    k = mx.zeros(SHAPE, mx.bfloat16)
    mx.eval(keys, values)
    spans = []
    for i in range(steps):
        a = 100 + i % 3000
        t0 = time.perf_counter()
        if explicit:
            keys[:, :, a : a + 1] = k
            values[:, :, a : a + 1] = k
            out = keys[:, :, : a + 1], values[:, :, : a + 1]
        else:
            keys[..., a : a + 1, :] = k
            values[..., a : a + 1, :] = k
            out = keys[..., : a + 1, :], values[..., : a + 1, :]
        spans.append(time.perf_counter() - t0)
        mx.eval(*out)
    return statistics.median(spans) * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    out = {
        "device": str(mx.default_device()),
        "update_and_fetch_us": {
            "KVCache": time_cache(KVCache, args.steps),
            "RotatingKVCache(512)": time_cache(lambda: RotatingKVCache(512), args.steps),
        },
        "two writes and two slices_us": {
            "[..., a:b, :]": time_slices(False, args.steps),
            "[:, :, a:b]": time_slices(True, args.steps),
        },
    }
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

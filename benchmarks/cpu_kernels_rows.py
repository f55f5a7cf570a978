"""lmx's CPU kernels for m = 1..8 rows of x (speculative verify, batched decode): time per product vs m.

Each product of the bundled Gemma 3 270M Q4_K_M (random blocks of its shapes and block types; values do
not change the speed) with m rows of x, for two builds of the kernels loaded side by side in one
process (``--base``: e.g. the ``main`` branch's ``.so`` copied aside; the new one: this tree's
``lmx.kernels`` module, or ``--new``), timed in turn (base, new, base, ...) so that load on a shared
machine hits both alike; medians of ``--repeat`` calls. It also checks that the two builds give the same
float32 values, and that an m-row product equals m one-row products bit for bit.

Usage::

    cp src/lmx/kernels/_lmx_kernels*.so /tmp/base/   # on main, before building the new kernels
    PYTHONPATH=src .venv/bin/python benchmarks/cpu_kernels_rows.py --base /tmp/base/_lmx_kernels*.so
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

# (type, rows, k, what): the tied head and one layer's products of the bundled Gemma 3 270M Q4_K_M
SHAPES = [
    (T.Q8_0, 262144, 640, "head"),
    (T.Q5_0, 2048, 640, "gate/up"),
    (T.Q6_K, 640, 2048, "down"),
    (T.Q4_K, 640, 1024, "o"),
    (T.Q5_0, 1024, 640, "q"),
]


def load(path: str, name: str):
    """A built ``_lmx_kernels`` module from ``path``, imported under its own package name."""
    spec = importlib.util.spec_from_file_location(f"{name}._lmx_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="path of the old build's _lmx_kernels*.so")
    p.add_argument("--new", help="path of the new build (default: this tree's lmx.kernels module)")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", default="1,2,3,4,5,6,7,8")
    p.add_argument("--shapes", default="", help="comma-separated names to keep (default all)")
    p.add_argument("--int8", action="store_true", help="time the opt-in int8-activation path instead")
    p.add_argument("--no-avx512", action="store_true", help="keep the new build to its AVX2 copy")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    if args.new:
        new = load(args.new, "lmx_new")
    else:
        from lmx.kernels import load_module

        new, reason = load_module()
        if new is None:
            print(f"CPU kernels unavailable: {reason}", file=sys.stderr)
            return 1
    builds = {"base": load(args.base, "lmx_base"), "new": new}
    for module in builds.values():
        module.set_num_threads(args.threads)
    avx512 = new.set_avx512(not args.no_avx512) if hasattr(new, "set_avx512") else False
    rows_list = [int(r) for r in args.rows.split(",")]
    keep = set(args.shapes.split(",")) if args.shapes else None
    rng = np.random.default_rng(0)
    results = []
    print(
        f"load average {os.getloadavg()}, threads {args.threads}, repeat {args.repeat}, new uses AVX-512VL: {avx512}, int8: {args.int8}"
    )
    for qtype, n, k, what in SHAPES:
        if keep and what not in keep:
            continue
        block, size = GGML_QUANT_SIZES[qtype]
        w = mx.array(rng.integers(0, 256, size=(n, k // block * size), dtype=np.uint8))
        if qtype in (T.Q8_0, T.Q5_0, T.Q4_0):  # keep the f16 scales finite and small
            raw = np.array(w).reshape(n, k // block, size)
            raw[:, :, :2] = np.float16(0.01).reshape(1).view(np.uint8)
            w = mx.array(raw.reshape(n, -1))
        elif qtype == T.Q4_K:
            raw = np.array(w).reshape(n, k // block, size)
            raw[:, :, :4] = np.array([0.01, 0.01], dtype=np.float16).view(np.uint8)
            w = mx.array(raw.reshape(n, -1))
        else:
            raw = np.array(w).reshape(n, k // block, size)
            raw[:, :, 208:210] = np.float16(0.01).reshape(1).view(np.uint8)
            w = mx.array(raw.reshape(n, -1))
        x_all = mx.array(rng.standard_normal((max(rows_list), k)).astype(np.float32))
        mx.eval(w, x_all)
        one_row = np.concatenate(
            [
                np.array(builds["new"].qmatmul(x_all[i : i + 1], w, int(qtype), k, int8_activations=args.int8))
                for i in range(x_all.shape[0])
            ]
        )
        base_t1 = new_t1 = None
        for m in rows_list:
            x = x_all[:m]
            outs = {
                name: np.array(b.qmatmul(x, w, int(qtype), k, int8_activations=args.int8)) for name, b in builds.items()
            }
            same_builds = bool(np.array_equal(outs["base"], outs["new"]))
            same_rows = bool(np.array_equal(outs["new"], one_row[:m]))
            times: dict[str, list[float]] = {name: [] for name in builds}
            for _ in range(args.repeat):
                for name, b in builds.items():
                    start = time.perf_counter()
                    mx.eval(b.qmatmul(x, w, int(qtype), k, int8_activations=args.int8))
                    times[name].append(time.perf_counter() - start)
            tb, tn = statistics.median(times["base"]) * 1e3, statistics.median(times["new"]) * 1e3
            base_t1 = base_t1 or tb
            new_t1 = new_t1 or tn
            row = {
                "type": qtype.name,
                "shape": [n, k],
                "what": what,
                "m": m,
                "base_ms": round(tb, 3),
                "new_ms": round(tn, 3),
                "base_vs_m1": round(tb / base_t1, 2),
                "new_vs_m1": round(tn / new_t1, 2),
                "speedup": round(tb / tn, 2),
                "same_as_base": same_builds,
                "same_as_one_row_products": same_rows,
            }
            results.append(row)
            print(
                f"{qtype.name:5} {n:>6}x{k:<5} {what:8} m={m}  base {tb:8.3f} ms ({tb / base_t1:4.2f}x m=1)  "
                f"new {tn:8.3f} ms ({tn / new_t1:4.2f}x m=1)  speedup {tb / tn:4.2f}  "
                f"bitwise: =base {same_builds} =1-row {same_rows}",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "loadavg": os.getloadavg(),
                    "threads": args.threads,
                    "avx512": avx512,
                    "int8": args.int8,
                    "results": results,
                },
                indent=1,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

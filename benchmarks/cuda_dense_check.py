"""GPU check and timing of lmx's float decode product (:mod:`lmx.kernels.cuda_dense`).

1. Values: for bf16, f16 and f32, 1-8 rows, inner sizes that do and do not fill a warp's 512-byte
   step, and row counts that leave a warp short, the kernel's ``x @ w.T`` against float32 on the CPU
   (the reference), next to MLX's own product on the GPU against the same reference. A case passes
   when the kernel's largest error is within 2 units in the last place of the output dtype at the
   largest output (float32: 1e-5 relative).
2. Speed: the decode products of Gemma 3 270M and 1B and Qwen 3 8B in bf16, one row: a chain of
   ``--chain`` products in one evaluation (the device's time a product, and GB/s of weights read),
   MLX against the kernel (each rows-per-warp choice), interleaved, median of ``--rounds``; and
   what each costs the host to build and to queue (``mx.async_eval``), per product.

    python benchmarks/cuda_dense_check.py --json out.json
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cuda_quantized_check import EPS, timed  # this folder: the same tolerances and device timing

from lmx.kernels import cuda_dense, cuda_quantized

SPEED_SHAPES = {  # name -> (N, K): fused q/k/v, o, fused gate/up, down, head
    "gemma3-270m qkv": (1536, 640),
    "gemma3-270m o": (640, 1024),
    "gemma3-270m gate/up": (4096, 640),
    "gemma3-270m down": (640, 2048),
    "gemma3-270m head": (262144, 640),
    "gemma3-1b qkv": (1536, 1152),
    "gemma3-1b gate/up": (13824, 1152),
    "gemma3-1b down": (1152, 6912),
    "qwen3-8b qkv": (6144, 4096),
    "qwen3-8b o": (4096, 4096),
    "qwen3-8b gate/up": (24576, 4096),
    "qwen3-8b down": (4096, 12288),
    "qwen3-8b head": (151936, 4096),
}


def check_values() -> dict[str, Any]:
    cases = []
    failures = []
    layouts = [(mx.bfloat16, m, shape) for m in (1, 3, 8) for shape in ((37, 640), (1030, 1152), (256, 4096))]
    layouts += [(mx.bfloat16, 1, shape) for shape in ((4096, 12288), (262144, 640))]  # Qwen 3 8B's down, 270M's head
    layouts += [(dtype, m, (300, 1000)) for dtype in (mx.float16, mx.float32) for m in (1, 5)]  # K = 1000: 125 chunks
    for dtype, m, (n, k) in layouts:
        w = (mx.random.normal((n, k), key=mx.random.key(n + k)) * 0.02).astype(dtype)
        x = (mx.random.normal((m, k), key=mx.random.key(m + k)) * 0.5).astype(dtype)
        ref = mx.matmul(x.astype(mx.float32), w.astype(mx.float32).T, stream=mx.cpu)  # no TF32
        mine = cuda_dense.decode_product(x, w).astype(mx.float32)
        theirs = (x @ w.T).astype(mx.float32)
        scale = mx.abs(ref).max()
        err = mx.abs(mine - ref).max()
        err_mlx = mx.abs(theirs - ref).max()
        equal = mx.mean((mine == theirs).astype(mx.float32))
        mx.eval(scale, err, err_mlx, equal)
        bound = 2 * EPS[dtype] * scale.item() + 1e-6
        case = {
            "dtype": str(dtype),
            "n": n,
            "k": k,
            "m": m,
            "max_abs": scale.item(),
            "err": err.item(),
            "err_mlx": err_mlx.item(),
            "equal_to_mlx": equal.item(),
            "ok": err.item() <= bound,
        }
        cases.append(case)
        print(("ok  " if case["ok"] else "FAIL"), case, flush=True)
        if not case["ok"]:
            failures.append(case)
    # a 3-d x (batch, 1, K) as a decode step may pass it, and every rows-per-warp choice
    w = (mx.random.normal((1030, 1152), key=mx.random.key(7)) * 0.02).astype(mx.bfloat16)
    x = mx.random.normal((4, 1, 1152), key=mx.random.key(3)).astype(mx.bfloat16)
    ref = mx.matmul(x.astype(mx.float32), w.astype(mx.float32).T, stream=mx.cpu)
    for r in (1, 2, 4):
        out = cuda_dense.decode_product(x, w, rows=r)
        err = mx.abs(out.astype(mx.float32) - ref).max().item()
        ok = out.shape == (4, 1, 1030) and err <= 2 * EPS[mx.bfloat16] * mx.abs(ref).max().item()
        cases.append({"three_d_rows_per_warp": r, "err": err, "ok": ok})
        if not ok:
            failures.append(cases[-1])
    print(f"values: {len(cases) - len(failures)} of {len(cases)} cases pass", flush=True)
    for f in failures[:10]:
        print("  FAIL", f, flush=True)
    return {"cases": cases, "failures": failures}


def host_cost(fn: Any, chain: int) -> tuple[float, float]:
    """Building and queueing ``chain`` products (each on the last's output sliced back to one row is
    not possible for N != K, so independent products of one input), per product, in us."""
    mx.synchronize()
    t0 = time.perf_counter()
    ys = [fn() for _ in range(chain)]
    t1 = time.perf_counter()
    mx.async_eval(ys)
    t2 = time.perf_counter()
    mx.eval(ys)
    mx.synchronize()
    return (t1 - t0) / chain * 1e6, (t2 - t1) / chain * 1e6


def check_speed(chain: int, rounds: int, rows: int) -> dict[str, Any]:
    results = {}
    for name, (n, k) in SPEED_SHAPES.items():
        w = (mx.random.normal((n, k), key=mx.random.key(1)) * 0.02).astype(mx.bfloat16)
        wt = w.T  # a Linear's product reads its weight's transposed view
        x = mx.random.normal((rows, k), key=mx.random.key(2)).astype(mx.bfloat16)
        mx.eval(w, x)
        fns = {"mlx": lambda x=x, wt=wt: x @ wt}
        for r in (1, 2, 4):
            fns[f"lmx r{r}"] = lambda x=x, w=w, r=r: cuda_dense.decode_product(x, w, rows=r)
        first = {label: timed(fn, 1) for label, fn in fns.items()}  # the kernel built on first use
        for fn in fns.values():
            timed(fn, 2)
        labels = list(fns)
        times: dict[str, list[float]] = {label: [] for label in labels}
        hosts: dict[str, list[tuple[float, float]]] = {label: [] for label in labels}
        for i in range(rounds):
            for label in labels[i % len(labels) :] + labels[: i % len(labels)]:
                times[label].append(timed(fns[label], chain))
                hosts[label].append(host_cost(fns[label], chain))
        med = {label: statistics.median(t) for label, t in times.items()}
        gbs = {label: w.nbytes / (us * 1e-6) / 1e9 for label, us in med.items()}
        build = {label: statistics.median(b for b, _ in h) for label, h in hosts.items()}
        queue = {label: statistics.median(q for _, q in h) for label, h in hosts.items()}
        auto = f"lmx r{cuda_quantized.rows_per_warp(n)}"
        results[name] = {
            "n": n,
            "k": k,
            "bytes": w.nbytes,
            "median_us": med,
            "gb_s": gbs,
            "build_us": build,
            "queue_us": queue,
            "runs_us": times,
            "first_call_us": first,
            "default": auto,
        }
        line = "  ".join(
            f"{label} {med[label]:7.1f} us {gbs[label]:5.0f} GB/s (host {build[label]:.1f}+{queue[label]:.1f})"
            for label in labels
        )
        print(f"{name:20} rows={rows}  {line}  (default {auto})", flush=True)
        del w, wt, x
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chain", type=int, default=50)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--rows", default="1", help="rows of x for the timing (comma-separated)")
    p.add_argument("--skip-values", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    out: dict[str, Any] = {"device": str(mx.default_device()), "mlx": mx.__version__}
    if not args.skip_values:
        out["values"] = check_values()
    out["speed"] = {int(m): check_speed(args.chain, args.rounds, int(m)) for m in args.rows.split(",")}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 1 if out.get("values", {}).get("failures") else 0


if __name__ == "__main__":
    sys.exit(main())

"""GPU check and timing of lmx's quantized decode product (:mod:`lmx.kernels.cuda_quantized`).

1. Values: for 4- and 8-bit weights, group sizes 32/64/128, 1-8 rows, bf16/f16/f32, inner sizes
   that do and do not fill a warp's 512-byte step, and row counts that leave a warp short, the
   kernel's product against float32 ``x @ dequantize(w).T`` on the CPU (the reference), next to MLX's own
   ``mx.quantized_matmul`` against the same reference. A case passes when the kernel's largest
   error is within the output dtype's rounding of the reference (2 ulps of the largest output,
   float32: 1e-5 relative).
2. Speed: the decode products of Qwen 3 8B, Gemma 3 1B and 270M in 4 bits (group 64), one row,
   a chain of ``--chain`` products in one evaluation, MLX against the kernel (each rows-per-warp
   choice), interleaved, median of ``--rounds``; microseconds a product and GB/s of weights read.

    python benchmarks/cuda_quantized_check.py --json out.json
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

from lmx.kernels import cuda_quantized

SPEED_SHAPES = {  # name -> (N, K)
    "qwen3-8b qkv": (6144, 4096),
    "qwen3-8b o": (4096, 4096),
    "qwen3-8b gate/up": (24576, 4096),
    "qwen3-8b down": (4096, 12288),
    "qwen3-8b head": (151936, 4096),
    "gemma3-1b qkv": (1536, 1152),
    "gemma3-1b gate/up": (13824, 1152),
    "gemma3-270m down": (640, 2048),
}
EPS = {mx.bfloat16: 2.0**-8, mx.float16: 2.0**-11, mx.float32: 1e-5}


def quantized(n: int, k: int, bits: int, group: int, dtype: mx.Dtype, seed: int) -> tuple[mx.array, ...]:
    w = mx.random.normal((n, k), key=mx.random.key(seed)) * 0.02
    q, s, b = mx.quantize(w.astype(dtype), group_size=group, bits=bits)
    mx.eval(q, s, b)
    return q, s, b


def check_values() -> dict[str, Any]:
    cases = []
    failures = []
    # each distinct (shape, layout, rows) is a kernel built on first use (seconds each): a sample
    layouts = [(4, 64, mx.bfloat16, m, shape) for m in (1, 3) for shape in ((37, 640), (1030, 1152), (256, 4096))]
    layouts += [(4, 64, mx.bfloat16, 1, shape) for shape in ((4096, 12288), (151936, 4096))]  # Qwen 3 8B's down, head
    layouts += [(bits, group, mx.bfloat16, 8, (1030, 1152)) for bits in (4, 8) for group in (32, 64, 128)]
    layouts += [(4, 64, dtype, 2, (256, 4096)) for dtype in (mx.float16, mx.float32)] + [
        (8, 32, mx.float32, 1, (37, 640))
    ]
    for bits, group, dtype, m, (n, k) in layouts:
        q, s, b = quantized(n, k, bits, group, dtype, seed=n + k + bits)
        ref_w = mx.dequantize(q, s, b, group_size=group, bits=bits).astype(mx.float32)
        x = (mx.random.normal((m, k), key=mx.random.key(m + k)) * 0.5).astype(dtype)
        ref = mx.matmul(x.astype(mx.float32), ref_w.T, stream=mx.cpu)  # no TF32
        mine = cuda_quantized.decode_product(x, q, s, b, group, bits).astype(mx.float32)
        theirs = mx.quantized_matmul(x, q, s, b, transpose=True, group_size=group, bits=bits)
        theirs = theirs.astype(mx.float32)
        scale = mx.abs(ref).max()
        err = mx.abs(mine - ref).max()
        err_mlx = mx.abs(theirs - ref).max()
        mx.eval(scale, err, err_mlx)
        bound = 2 * EPS[dtype] * scale.item() + 1e-6
        case = {
            "bits": bits,
            "group": group,
            "dtype": str(dtype),
            "n": n,
            "k": k,
            "m": m,
            "max_abs": scale.item(),
            "err": err.item(),
            "err_mlx": err_mlx.item(),
            "ok": err.item() <= bound,
        }
        cases.append(case)
        print(("ok  " if case["ok"] else "FAIL"), case, flush=True)
        if not case["ok"]:
            failures.append(case)
    # a 3-d x (batch, 1, K) as the decode step passes it, and every rows-per-warp choice
    q, s, b = quantized(1030, 1152, 4, 64, mx.bfloat16, seed=7)
    x = mx.random.normal((4, 1, 1152), key=mx.random.key(3)).astype(mx.bfloat16)
    ref = mx.matmul(
        x.astype(mx.float32), mx.dequantize(q, s, b, group_size=64, bits=4).astype(mx.float32).T, stream=mx.cpu
    )
    for r in (1, 2, 4):
        out = cuda_quantized.decode_product(x, q, s, b, 64, 4, rows=r)
        err = mx.abs(out.astype(mx.float32) - ref).max().item()
        ok = out.shape == (4, 1, 1030) and err <= 2 * EPS[mx.bfloat16] * mx.abs(ref).max().item()
        cases.append({"three_d_rows_per_warp": r, "err": err, "ok": ok})
        if not ok:
            failures.append(cases[-1])
    print(f"values: {len(cases) - len(failures)} of {len(cases)} cases pass", flush=True)
    for f in failures[:10]:
        print("  FAIL", f, flush=True)
    return {"cases": len(cases), "failures": failures}


def timed(fn: Any, chain: int) -> float:
    mx.synchronize()
    t0 = time.perf_counter()
    mx.eval([fn() for _ in range(chain)])
    mx.synchronize()
    return (time.perf_counter() - t0) / chain * 1e6


def check_speed(chain: int, rounds: int, rows: int) -> dict[str, Any]:
    results = {}
    for name, (n, k) in SPEED_SHAPES.items():
        q, s, b = quantized(n, k, 4, 64, mx.bfloat16, seed=1)
        x = mx.random.normal((rows, k), key=mx.random.key(2)).astype(mx.bfloat16)
        dense = mx.dequantize(q, s, b, group_size=64, bits=4).T  # bf16 (K, N) view: what a bf16 model reads
        mx.eval(x, dense)
        nbytes = q.nbytes + s.nbytes + b.nbytes
        fns = {"mlx": lambda q=q, s=s, b=b, x=x: mx.quantized_matmul(x, q, s, b, transpose=True, group_size=64, bits=4)}
        for r in (1, 2, 4):
            fns[f"lmx r{r}"] = lambda q=q, s=s, b=b, x=x, r=r: cuda_quantized.decode_product(x, q, s, b, 64, 4, rows=r)
        times: dict[str, list[float]] = {label: [] for label in fns}
        first = {label: timed(fn, 1) for label, fn in fns.items()}  # the kernel built on first use
        for fn in fns.values():
            timed(fn, 2)
        labels = list(fns)
        for i in range(rounds):
            for label in labels[i % len(labels) :] + labels[: i % len(labels)]:
                times[label].append(timed(fns[label], chain))
        dense_us = statistics.median(timed(lambda x=x, dense=dense: x @ dense, chain) for _ in range(rounds))
        med = {label: statistics.median(t) for label, t in times.items()}
        gbs = {label: nbytes / (us * 1e-6) / 1e9 for label, us in med.items()}
        med["bf16 dense"] = dense_us
        gbs["bf16 dense"] = dense.nbytes / (dense_us * 1e-6) / 1e9
        labels.append("bf16 dense")
        del dense
        auto = f"lmx r{cuda_quantized.rows_per_warp(n)}"
        results[name] = {
            "n": n,
            "k": k,
            "bytes": nbytes,
            "median_us": med,
            "gb_s": gbs,
            "runs_us": times,
            "first_call_us": first,
            "default": auto,
        }
        line = "  ".join(f"{label} {med[label]:7.1f} us {gbs[label]:6.0f} GB/s" for label in labels)
        print(f"{name:20} rows={rows}  {line}  (default {auto})", flush=True)
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
    out["speed"] = {int(m): check_speed(args.chain, args.rounds, int(m)) for m in args.rows.split(",")}
    if not args.skip_values:
        out["values"] = check_values()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 1 if out.get("values", {}).get("failures") else 0


if __name__ == "__main__":
    sys.exit(main())

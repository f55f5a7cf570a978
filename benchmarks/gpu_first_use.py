"""What the first use of each kind of GPU kernel costs a fresh process, and whether MLX's on-disk
cache of compiled kernels takes that cost away in the next process.

MLX's CUDA backend compiles some kernels with NVRTC when first used (its quantized products, fused
elementwise graphs, every ``mx.fast.cuda_kernel``) and keeps the binaries in ``MLX_PTX_CACHE_DIR``
(default: ``<temp dir>/mlx/<version>/ptx``). Run it twice with the same cache: the first process
compiles, the second should read the cache.

    rm -rf /tmp/ptx && MLX_PTX_CACHE_DIR=/tmp/ptx python benchmarks/gpu_first_use.py --label cold
    MLX_PTX_CACHE_DIR=/tmp/ptx python benchmarks/gpu_first_use.py --label warm

Each line: the first call's seconds (graph build, compile, run) and the second's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lmx.kernels import cuda_attention, cuda_dense


def cache_dir() -> Path:
    return Path(os.environ.get("MLX_PTX_CACHE_DIR") or Path(tempfile.gettempdir()) / "mlx" / mx.__version__ / "ptx")


def timed(make: Callable[[], mx.array]) -> float:
    start = time.perf_counter()
    mx.eval(make())
    mx.synchronize()
    return time.perf_counter() - start


def cases() -> dict[str, Callable[[], mx.array]]:
    key = mx.random.key(0)
    x1 = mx.random.normal((1, 1152), key=key).astype(mx.bfloat16)
    x512 = mx.random.normal((512, 1152), key=key).astype(mx.bfloat16)
    w = (mx.random.normal((1536, 1152), key=key) * 0.02).astype(mx.bfloat16)
    quantized = {bits: mx.quantize(w, group_size=32, bits=bits) for bits in (4, 5, 8)}
    q = mx.random.normal((1, 4, 1, 256), key=key).astype(mx.bfloat16)
    kv = mx.random.normal((1, 1, 64, 256), key=key).astype(mx.bfloat16)
    mx.eval(x1, x512, w, q, kv, *[a for t in quantized.values() for a in t])
    fused = mx.compile(lambda a, b: mx.tanh(a * b + 1.0) * 0.5)
    out: dict[str, Callable[[], mx.array]] = {"matmul bf16, one row": lambda: x1 @ w.T}
    for bits, (wq, scales, biases) in quantized.items():
        for name, x in (("one row", x1), ("512 rows", x512)):
            out[f"quantized_matmul {bits}-bit group 32, {name}"] = lambda x=x, wq=wq, s=scales, b=biases, bits=bits: (
                mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=32, bits=bits)
            )
    out["compiled elementwise (tanh(a*b+1)*0.5)"] = lambda: fused(x1, x1)
    out["lmx cuda_dense product, one row"] = lambda: cuda_dense.decode_product(x1, w)
    out["lmx cuda_attention, one query"] = lambda: cuda_attention.decode_attention(q, kv, kv, 0.0625)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", default="run")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    directory = cache_dir()
    before = len(list(directory.glob("*"))) if directory.is_dir() else 0
    start = time.perf_counter()
    made = cases()
    setup = time.perf_counter() - start
    rows: dict[str, dict[str, float | str]] = {}
    for name, make in made.items():
        try:
            rows[name] = {"first_s": timed(make), "second_s": timed(make)}
        except Exception as e:  # one kernel failing must not cost the others their numbers
            rows[name] = {"error": f"{type(e).__name__}: {e}"}
        line = rows[name]
        shown = line.get("error") or f"first {line['first_s']:8.3f} s   second {line['second_s'] * 1e3:8.3f} ms"
        print(f"{args.label:6s} {name:44s} {shown}", flush=True)
    after = len(list(directory.glob("*"))) if directory.is_dir() else 0
    result = {
        "label": args.label,
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "cache_dir": str(directory),
        "cache_files_before": before,
        "cache_files_after": after,
        "setup_s": setup,
        "cases": rows,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "cases"}))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

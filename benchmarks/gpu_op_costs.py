"""What one op of each kind costs the host: building it (Python) and queueing it (``mx.async_eval``).

    python benchmarks/gpu_op_costs.py [--device gpu] [--chain 200] [--repeat 7] [--json out.json]

A decode step on a GPU is bound by the host (benchmarks/RESULTS.md): with the step thread, by
MLX's queueing of its ops. Which ops cost most there says what to cut. For each kind, a chain of
``--chain`` ops of that kind on decode-sized arrays (one row of 1,152, Gemma 3 1B's hidden size)
is built and queued; the medians over ``--repeat`` chains, per op, are printed as one JSON
object. The device's own time is waited for outside both spans.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import lmx.runtime  # noqa: F401  # isort: skip  (first: BLAS set-up before mlx.core)
import mlx.core as mx

from lmx.kernels import cuda_attention, cuda_dense

D = 1152
HEADS, HEAD_DIM = 4, 256


def kinds(dtype: mx.Dtype) -> dict[str, tuple[Callable[[], mx.array], Callable[[mx.array], mx.array]]]:
    """kind -> (the chain's first array, one op of the kind applied to the last)."""
    key = mx.random.key(0)
    w = mx.random.normal((D, D), key=key).astype(dtype) * 0.02
    wq, scales, biases = mx.quantize(mx.random.normal((D, D), key=key) * 0.02, group_size=64, bits=4)
    norm_w = mx.ones((D,), dtype=dtype)
    big = mx.zeros((1, 2 * D), dtype=dtype)
    cache = mx.zeros((1, HEADS, 512, HEAD_DIM), dtype=dtype)
    # Qwen 3 8B's attention: 32 query heads on 8 key/value heads of 128, 520 keys of a 768-slot cache
    # (lmx's cache grows by 256): MLX fuses head_dim 128 (cuDNN over 256+ keys of such a cache)
    qwen_cache = mx.random.normal((1, 8, 768, 128), key=key).astype(dtype)
    qwen_keys = qwen_cache[:, :, :520, :]
    wt = w.T  # what a Linear multiplies by: its (out, in) weight's transposed view
    mx.eval(w, wq, scales, biases, norm_w, big, cache, qwen_cache)
    row = lambda: mx.random.normal((1, D), key=key).astype(dtype)  # noqa: E731
    heads = lambda: mx.random.normal((1, HEADS, 1, HEAD_DIM), key=key).astype(dtype)  # noqa: E731
    qwen_heads = lambda: mx.random.normal((1, 32, 1, 128), key=key).astype(dtype)  # noqa: E731
    fused = mx.compile(lambda x: (x * 0.5 + 1.0) * x)

    def slice_update(x: mx.array) -> mx.array:
        return mx.slice_update(cache, x, mx.array([0, 0, 7, 0]), axes=(0, 1, 2, 3))[:, :, 7:8, :]

    def attention(x: mx.array) -> mx.array:
        return mx.fast.scaled_dot_product_attention(x, cache, cache, scale=HEAD_DIM**-0.5)

    table = {
        "add": (row, lambda x: x + 1.0),
        "compiled (3 elementwise ops as one)": (row, fused),
        "rms_norm": (row, lambda x: mx.fast.rms_norm(x, norm_w, 1e-6)),
        "rope": (heads, lambda x: mx.fast.rope(x, HEAD_DIM, traditional=False, base=10000.0, scale=1.0, offset=7)),
        "2 reshapes (no copy)": (row, lambda x: x.reshape(1, 2, D // 2).reshape(1, D)),
        "concatenate + slice": (row, lambda x: mx.concatenate([x, x], axis=-1)[:, :D]),
        "matmul, one row": (row, lambda x: x @ w),
        "matmul, one row, by a transposed view (a Linear's)": (row, lambda x: x @ wt),
        "quantized_matmul 4-bit, one row": (row, lambda x: mx.quantized_matmul(x, wq, scales, biases, True, 64, 4)),
        "slice_update (cache write)": (heads, slice_update),
        "sdpa, one query, 512 keys": (heads, attention),
        "sdpa, one query, head_dim 128, 520 keys (MLX fused)": (
            qwen_heads,
            lambda x: mx.fast.scaled_dot_product_attention(x, qwen_keys, qwen_keys, scale=128**-0.5),
        ),
    }
    if mx.cuda.is_available():  # a custom kernel, as lmx's attention is one: what its launch costs
        kernel = mx.fast.cuda_kernel(
            name="lmx_probe_copy",
            input_names=["x"],
            output_names=["y"],
            source="const int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < D) y[i] = x[i];",
        )

        def custom(x: mx.array) -> mx.array:
            return kernel(
                inputs=[x],
                template=[("T", x.dtype), ("D", D)],
                grid=(D, 1, 1),
                threadgroup=(128, 1, 1),
                output_shapes=[x.shape],
                output_dtypes=[x.dtype],
            )[0]

        table["mx.fast.cuda_kernel (a copy)"] = (row, custom)
        table["lmx cuda_dense product, one row"] = (row, lambda x: cuda_dense.decode_product(x, w))
        table["lmx cuda_attention, head_dim 256, 512 keys"] = (
            heads,
            lambda x: cuda_attention.decode_attention(x, cache, cache, HEAD_DIM**-0.5),
        )
        table["lmx cuda_attention, head_dim 128, 520 keys"] = (
            qwen_heads,
            lambda x: cuda_attention.decode_attention(x, qwen_keys, qwen_keys, 128**-0.5),
        )
    return table


def measure(first: Callable[[], mx.array], op: Callable[[mx.array], mx.array], chain: int) -> tuple[float, float]:
    x = first()
    mx.eval(x)
    mx.synchronize()
    t0 = time.perf_counter()
    y = x
    for _ in range(chain):
        y = op(y)
    t1 = time.perf_counter()
    mx.async_eval(y)
    t2 = time.perf_counter()
    mx.eval(y)
    mx.synchronize()
    return (t1 - t0) / chain * 1e6, (t2 - t1) / chain * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="gpu", choices=["cpu", "gpu"])
    p.add_argument("--chain", type=int, default=200)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    dtype = mx.bfloat16 if args.device == "gpu" else mx.float32
    result: dict[str, dict[str, float]] = {}
    errors: dict[str, str] = {}
    for name, (first, op) in kinds(dtype).items():
        try:
            measure(first, op, 8)  # warm-up: kernels compiled, buffers cached
            runs = [measure(first, op, args.chain) for _ in range(args.repeat)]
        except Exception as e:  # one kind that fails must not cost the others
            errors[name] = f"{type(e).__name__}: {e}"
            continue
        result[name] = {
            "build_us": statistics.median(b for b, _ in runs),
            "queue_us": statistics.median(q for _, q in runs),
        }
        print(
            f"{name:52s} build {result[name]['build_us']:6.2f} us  queue {result[name]['queue_us']:6.2f} us", flush=True
        )
    out = {
        "device": str(mx.default_device()),
        "mlx": mx.__version__,
        "chain": args.chain,
        "ops": result,
        "errors": errors,
    }
    print(json.dumps(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

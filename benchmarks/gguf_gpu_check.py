"""On the device: MLX's affine quantized products of the bit widths GGUF maps to (q4/q5/q8, group 32),
bf16 activations and scales, against a float product of the dequantized weights.

    python benchmarks/gguf_gpu_check.py
"""

from __future__ import annotations

import json
import time

import mlx.core as mx


def main() -> None:
    out = {"device": str(mx.default_device())}
    t0 = time.perf_counter()
    for bits in (4, 5, 8):
        w = mx.random.normal((1024, 2048)) * 0.02
        q, s, b = mx.quantize(w, group_size=32, bits=bits)
        s, b = s.astype(mx.bfloat16), b.astype(mx.bfloat16)
        dense = mx.dequantize(q, s, b, group_size=32, bits=bits).astype(mx.float32)
        row = {}
        for m in (1, 7, 512):
            x = mx.random.normal((m, 2048)).astype(mx.bfloat16)
            y = mx.quantized_matmul(x, q, s, b, transpose=True, group_size=32, bits=bits)
            ref = x.astype(mx.float32) @ dense.T
            err = mx.abs(y.astype(mx.float32) - ref).max() / mx.abs(ref).max()
            row[f"m{m}"] = {"dtype": str(y.dtype), "max_rel_err": round(err.item(), 5)}
        e = mx.random.randint(0, 1024, (4, 9))
        emb = mx.dequantize(q[e], s[e], b[e], group_size=32, bits=bits)
        row["gather"] = bool(mx.allclose(emb.astype(mx.float32), dense[e], atol=1e-6).item())
        out[f"q{bits}"] = row
        print(f"q{bits} ({time.perf_counter() - t0:.1f} s): {json.dumps(row)}", flush=True)  # a time-out keeps the rest
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""GPU check of lmx's one-query CUDA attention kernel (:mod:`lmx.kernels.cuda_attention`).

The kernel cannot run on a machine without CUDA, so this script is its test: on a CUDA GPU it
compares ``decode_attention`` with a float32 reference computed on the CPU stream, and with
MLX's own GPU path (the fallback it replaces), over key counts 1..4097, grouped-query ratios 1
and 4, head dims 256 and 128, batch 1 and 2, strided cache views (a prefix of a larger storage,
a window inside it) and a strided query, with the kernel's tiled loop (which such views take, here from
the first key: ``TILED_MIN_KEYS = 0``), again with its strided loop (``TILED_KEYS = False``), and with
the keys split over blocks (``SPLIT_KEYS``, from 256 keys), the padded-row and span checks too. Then it checks when ``attention()`` picks the kernel,
and times a chain of calls (one op vs the fallback's ops). Exit status 1 on any failure.

Usage (GPU host, repo root)::

    PYTHONPATH=src python3 benchmarks/cuda_attention_check.py --json $OUT/cuda_attention_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import mlx.core as mx  # noqa: E402

from lmx.kernels import cuda_attention  # noqa: E402
from lmx.models.base import attention  # noqa: E402
from lmx.runtime.ops import CudaOps  # noqa: E402

# Allowed max |kernel - reference| over max |reference|: float32 as asked; bf16/fp16: the kernel
# rounds its float32 result once (half an ulp: at most 2^-8 / 2^-11 of the value), plus 5% for float32 error.
TOLERANCE = {"float32": 1e-5, "bfloat16": 1.05 * 2.0**-8, "float16": 1.05 * 2.0**-11}


def reference(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """float32 attention from element-wise products and sums (no matmul, so no TF32 either)."""
    q32, k32, v32 = (x.astype(mx.float32) for x in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k32, v32 = mx.repeat(k32, rep, axis=1), mx.repeat(v32, rep, axis=1)  # (B, H, L, D)
    scores = mx.sum(q32 * k32, axis=-1) * scale  # (B, H, L)
    probs = mx.softmax(scores, axis=-1, precise=True)
    out = mx.sum(probs[..., None] * v32, axis=-2, keepdims=True)  # (B, H, 1, D)
    mx.eval(out)
    return out


def rel_err(out: mx.array, ref: mx.array, peak: float | None = None) -> float:
    """The largest difference of ``out`` from ``ref`` (in float32) over ``peak`` (default: ``ref``'s largest magnitude)."""
    peak = mx.max(mx.abs(ref)).item() if peak is None else peak
    return mx.max(mx.abs(out.astype(mx.float32) - ref.astype(mx.float32))).item() / peak


def inputs(
    batch: int, n_heads: int, n_kv: int, n_keys: int, d: int, dtype: mx.Dtype, layout: str, seed: int
) -> tuple[mx.array, mx.array, mx.array]:
    """q (B, H, 1, D) and k/v (B, n_kv, n_keys, D) views laid out as ``layout`` says."""
    key = mx.random.key(seed)
    kq, kk, kv = mx.random.split(key, 3)
    extra = 300 if layout != "contiguous" else 0
    start = 37 if layout == "window" else 0
    k_store = mx.random.normal((batch, n_kv, n_keys + extra, d), key=kk).astype(dtype)  # (B, n_kv, S, D)
    v_store = mx.random.normal((batch, n_kv, n_keys + extra, d), key=kv).astype(dtype)
    k = k_store[..., start : start + n_keys, :]
    v = v_store[..., start : start + n_keys, :]
    if layout == "window":  # a strided query too: every other head of a wider array
        q = (mx.random.normal((batch, 2 * n_heads, 1, d), key=kq) * 2.0).astype(dtype)[:, ::2]
    else:
        q = (mx.random.normal((batch, n_heads, 1, d), key=kq) * 2.0).astype(dtype)
    mx.eval(q, k, v)
    return q, k, v


def check_values() -> tuple[list[dict[str, Any]], bool]:
    rows, ok = [], True
    seed = 0
    for d in (256, 128):
        for n_heads, n_kv in ((4, 4), (8, 2)):
            for n_keys in (1, 7, 256, 1000, 4097):
                for dtype in (mx.float32, mx.bfloat16):
                    for layout, batch in (("prefix", 1), ("window", 2), ("contiguous", 1)):
                        if layout == "contiguous" and dtype != mx.float32:
                            continue
                        seed += 1
                        q, k, v = inputs(batch, n_heads, n_kv, n_keys, d, dtype, layout, seed)
                        scale = 256.0**-0.5 if d == 256 else d**-0.5
                        out = cuda_attention.decode_attention(q, k, v, scale)
                        fallback = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
                        mx.eval(out, fallback)
                        ref = reference(q, k, v, scale)
                        peak = mx.max(mx.abs(ref)).item()
                        err, fb_err = rel_err(out, ref, peak), rel_err(fallback, ref, peak)
                        vs_fb = rel_err(out, fallback, peak)
                        name = str(dtype).split(".")[-1]
                        good = (
                            out.shape == q.shape and out.dtype == dtype and err <= TOLERANCE[name] and err == err
                        )  # err == err: not NaN
                        ok &= good
                        rows.append(
                            {
                                "d": d,
                                "heads": n_heads,
                                "kv_heads": n_kv,
                                "keys": n_keys,
                                "dtype": name,
                                "layout": layout,
                                "batch": batch,
                                "rel_err_vs_f32_ref": err,
                                "fallback_rel_err_vs_f32_ref": fb_err,
                                "rel_diff_vs_fallback": vs_fb,
                                "ok": good,
                            }
                        )
                        print(
                            f"D={d} H={n_heads}/{n_kv} L={n_keys:5d} {name:8} {layout:10} B={batch}: "
                            f"kernel {err:.2e}  fallback {fb_err:.2e}  kernel-fallback {vs_fb:.2e}"
                            f"  {'ok' if good else 'FAIL'}",
                            flush=True,
                        )
    # float16 once (the dtype the kernel also accepts)
    q, k, v = inputs(2, 8, 2, 1000, 256, mx.float16, "window", 999)
    out = cuda_attention.decode_attention(q, k, v, 0.0625)
    ref = reference(q, k, v, 0.0625)
    err = rel_err(out, ref)
    good = err <= TOLERANCE["float16"]
    ok &= good
    rows.append({"d": 256, "dtype": "float16", "keys": 1000, "layout": "window", "rel_err_vs_f32_ref": err, "ok": good})
    print(f"D=256 float16 L=1000 window: kernel {err:.2e}  {'ok' if good else 'FAIL'}", flush=True)
    return rows, ok


def check_from() -> tuple[list[dict[str, Any]], bool]:
    """:func:`decode_attention_from` (padded rows: row b sees keys from first[b] on) against the float32
    reference of each row's own keys, and against MLX's masked attention (what it replaces)."""
    rows, ok = [], True
    for d in (256, 128):
        for n_heads, n_kv in ((4, 1), (8, 2)):
            for n_keys in (7, 300, 1000):
                for dtype in (mx.float32, mx.bfloat16):
                    q, k, v = inputs(3, n_heads, n_kv, n_keys, d, dtype, "prefix", 7 * n_keys + d)
                    first = mx.array([0, n_keys // 3, n_keys - 1], dtype=mx.int32)
                    scale = d**-0.5
                    with cuda_attention.inference():
                        out = cuda_attention.decode_attention_from(q, k, v, scale, first)
                    mask = (mx.arange(n_keys)[None] >= first[:, None])[:, None, None]  # (B, 1, 1, S)
                    masked = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
                    refs = [
                        reference(q[b : b + 1], k[b : b + 1, :, f:], v[b : b + 1, :, f:], scale)
                        for b, f in enumerate(first.tolist())
                    ]
                    ref = mx.concatenate(refs, axis=0)
                    mx.eval(out, masked, ref)
                    peak = mx.max(mx.abs(ref)).item()
                    err, vs_masked = rel_err(out, ref, peak), rel_err(out, masked, peak)
                    name = str(dtype).split(".")[-1]
                    good = out.shape == q.shape and err <= TOLERANCE[name] and err == err
                    ok &= good
                    rows.append(
                        {
                            "d": d,
                            "heads": n_heads,
                            "kv_heads": n_kv,
                            "keys": n_keys,
                            "dtype": name,
                            "rel_err_vs_f32_ref": err,
                            "rel_diff_vs_masked_mlx": vs_masked,
                            "ok": good,
                        }
                    )
                    print(
                        f"from-first D={d} H={n_heads}/{n_kv} L={n_keys:5d} {name:8}: kernel {err:.2e}"
                        f"  vs masked MLX {vs_masked:.2e}  {'ok' if good else 'FAIL'}",
                        flush=True,
                    )
    return rows, ok


def check_span() -> tuple[list[dict[str, Any]], bool]:
    """:func:`decode_attention_span` (every row sees the keys ``span[0] <= i < span[1]`` of a fixed
    storage: a compiled decode step) against the float32 reference of those keys alone."""
    rows, ok = [], True
    for d in (256, 128):
        for n_heads, n_kv in ((4, 1), (8, 2)):
            for n_keys, lo, hi in ((7, 0, 1), (300, 0, 177), (768, 255, 767), (1024, 1, 1024), (1024, 5, 9)):
                for dtype in (mx.float32, mx.bfloat16):
                    q, k, v = inputs(2, n_heads, n_kv, n_keys, d, dtype, "prefix", 11 * n_keys + d + lo)
                    scale = d**-0.5
                    with cuda_attention.inference():
                        out = cuda_attention.decode_attention_span(q, k, v, scale, mx.array([lo, hi], dtype=mx.int32))
                    ref = reference(q, k[:, :, lo:hi], v[:, :, lo:hi], scale)
                    mx.eval(out, ref)
                    err = rel_err(out, ref)
                    name = str(dtype).split(".")[-1]
                    good = out.shape == q.shape and err <= TOLERANCE[name] and err == err
                    ok &= good
                    rows.append({"d": d, "heads": n_heads, "kv_heads": n_kv, "keys": n_keys, "span": [lo, hi],
                                 "dtype": name, "rel_err_vs_f32_ref": err, "ok": good})  # fmt: skip
                    print(
                        f"span D={d} H={n_heads}/{n_kv} L={n_keys:5d} [{lo}, {hi}) {name:8}: kernel {err:.2e}"
                        f"  {'ok' if good else 'FAIL'}",
                        flush=True,
                    )
    return rows, ok


def time_padded(n_keys: int = 640, batch: int = 32, steps: int = 200, rounds: int = 5) -> dict[str, float]:
    """Microseconds per call of 18 chained padded one-query attentions (a Gemma 3 270M step's layers),
    kernel vs MLX's masked path, bf16, 32 rows."""
    q, k, v = inputs(batch, 4, 1, n_keys, 256, mx.bfloat16, "prefix", 5)
    first = mx.arange(batch, dtype=mx.int32) * 3
    mask = (mx.arange(n_keys)[None] >= first[:, None])[:, None, None]
    out: dict[str, float] = {}
    for name in ("kernel", "masked"):
        best = float("inf")
        for _ in range(rounds):
            t = time.perf_counter()
            for _ in range(steps // 18):
                x = q
                with cuda_attention.inference():
                    for _ in range(18):
                        if name == "kernel":
                            x = cuda_attention.decode_attention_from(x, k, v, 0.0625, first)
                        else:
                            x = mx.fast.scaled_dot_product_attention(x, k, v, scale=0.0625, mask=mask)
                mx.eval(x)
            best = min(best, (time.perf_counter() - t) / (steps // 18 * 18) * 1e6)
        out[f"padded_{name}_us_per_call"] = best
    return out


def check_dispatch() -> tuple[dict[str, Any], bool]:
    """attention() through the ops a CUDA load profile picks (CudaOps) takes the kernel for D=256, one query,
    no mask; not for D=128, a mask, or the switch off."""
    q, k, v = inputs(1, 4, 1, 300, 256, mx.bfloat16, "prefix", 5)
    q128, k128, v128 = inputs(1, 4, 1, 300, 128, mx.bfloat16, "prefix", 6)
    mask = mx.ones((1, 1, 1, 300), dtype=mx.bool_)
    got = {
        "d256_no_mask": cuda_attention.wanted(q, k, v, 0.0625),
        "d128_no_mask": cuda_attention.wanted(q128, k128, v128, 128**-0.5),
    }
    os.environ[cuda_attention.ENV_SWITCH] = "0"
    got["d256_switched_off"] = cuda_attention.wanted(q, k, v, 0.0625)
    del os.environ[cuda_attention.ENV_SWITCH]
    ops = CudaOps(cuda_attention)
    out = attention(q, k, v, 0.0625, None, ops=ops)
    direct = cuda_attention.decode_attention(q, k, v, 0.0625)
    masked = attention(q, k, v, 0.0625, mask, ops=ops)
    got["attention_equals_kernel"] = mx.array_equal(out, direct).item()
    got["masked_close_to_kernel"] = mx.allclose(masked, direct, atol=2e-2, rtol=2e-2).item()
    want = {
        "d256_no_mask": True,
        "d128_no_mask": False,
        "d256_switched_off": False,
        "attention_equals_kernel": True,
        "masked_close_to_kernel": True,
    }
    print(f"dispatch: {got}", flush=True)
    return got, got == want


def check_gradient() -> tuple[dict[str, float], bool]:
    """The kernel's gradient (MLX's attention's, through mx.custom_function) equals MLX's own, float32."""
    q, k, v = inputs(1, 4, 1, 300, 256, mx.float32, "prefix", 8)

    def loss(f: Any) -> Any:
        return lambda q, k, v: (f(q, k, v) ** 2).sum()

    ours = mx.grad(loss(lambda q, k, v: cuda_attention.decode_attention(q, k, v, 0.0625)), argnums=(0, 1, 2))(q, k, v)
    want = mx.grad(
        loss(lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.0625)), argnums=(0, 1, 2)
    )(q, k, v)
    errs = {
        name: (mx.abs(a - b).max() / mx.maximum(mx.abs(b).max(), 1e-30)).item()
        for name, a, b in zip(("dq", "dk", "dv"), ours, want)
    }
    print(f"gradient rel err: {errs}", flush=True)
    # Both sides are MLX's attention gradient; their cotangents differ by the forward's rounding
    # (~1e-6), which can flip the TF32 rounding of single elements in the GPU's backward matmuls
    # (2^-11 ~ 5e-4 each): measured 6-7e-4 on an H200.
    return errs, all(e < 2e-3 for e in errs.values())


def time_chain(n_keys: int = 640, steps: int = 200, rounds: int = 5) -> dict[str, float]:
    """Microseconds per call of a chain of ``steps`` attention calls (each output the next query):
    graph build + eval, kernel vs MLX's fallback, bf16, Gemma 3 1B's shapes (4 heads, 1 KV head)."""
    q, k, v = inputs(1, 4, 1, n_keys, 256, mx.bfloat16, "prefix", 7)
    out: dict[str, float] = {}
    for name, fn in (
        ("kernel", lambda x: cuda_attention.decode_attention(x, k, v, 0.0625)),
        ("fallback", lambda x: mx.fast.scaled_dot_product_attention(x, k, v, scale=0.0625)),
    ):
        times = []
        for _ in range(rounds):
            x = q
            t0 = time.perf_counter()
            for _ in range(steps):
                x = fn(x)
            mx.eval(x)
            times.append((time.perf_counter() - t0) / steps * 1e6)
        out[f"{name}_us_per_call"] = sorted(times)[len(times) // 2]
    print(f"chain of {steps} calls, L={n_keys}: {out}", flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not cuda_attention.cuda_available():
        print("no CUDA device: nothing to check", flush=True)
        return 2
    mx.set_default_device(mx.gpu)
    try:
        info = {k: v for k, v in mx.device_info().items() if isinstance(v, (str, int))}
    except Exception as e:  # device_info differs between backends
        info = {"error": str(e)}
    meta = {"mlx": mx.__version__, "device_info": info}
    print(json.dumps(meta), flush=True)
    t0 = time.perf_counter()
    saved = (cuda_attention.TILED_MIN_KEYS, cuda_attention.SPLIT_KEYS, cuda_attention.SPLIT_MIN_KEYS)
    cuda_attention.TILED_MIN_KEYS = 0  # the tiled loop for every length (a cache's rows: unit stride, aligned)
    try:
        rows, values_ok = check_values()
        cuda_attention.TILED_KEYS = False  # then the strided loop for the same cases
        strided_rows, strided_ok = check_values()
        cuda_attention.TILED_KEYS = True  # then the keys split over blocks (from 256 keys: 2+ blocks of 128)
        cuda_attention.SPLIT_KEYS, cuda_attention.SPLIT_MIN_KEYS = True, 0
        split_rows, split_ok = check_values()
        split_from_rows, split_from_ok = check_from()
        split_span_rows, split_span_ok = check_span()
    finally:
        cuda_attention.TILED_KEYS = True
        cuda_attention.TILED_MIN_KEYS, cuda_attention.SPLIT_KEYS, cuda_attention.SPLIT_MIN_KEYS = saved
    values_ok &= strided_ok and split_ok and split_from_ok and split_span_ok
    rows += [{**r, "loop": "strided"} for r in strided_rows] + [{**r, "loop": "split"} for r in split_rows]
    rows += [{**r, "loop": "split", "check": "from"} for r in split_from_rows]
    rows += [{**r, "loop": "split", "check": "span"} for r in split_span_rows]
    dispatch, dispatch_ok = check_dispatch()
    gradient, gradient_ok = check_gradient()
    from_rows, from_ok = check_from()
    span_rows, span_ok = check_span()
    timing = (time_chain() | time_padded()) if values_ok and from_ok else {}
    result = {
        "meta": meta,
        "ok": values_ok and dispatch_ok and gradient_ok and from_ok and span_ok,
        "from_first_ok": from_ok,
        "from_first_rows": from_rows,
        "span_ok": span_ok,
        "span_rows": span_rows,
        "values_ok": values_ok,
        "dispatch_ok": dispatch_ok,
        "max_rel_err": {
            dt: max(r["rel_err_vs_f32_ref"] for r in rows if r["dtype"] == dt)
            for dt in ("float32", "bfloat16", "float16")
        },
        "max_fallback_rel_err": {
            dt: max(
                r["fallback_rel_err_vs_f32_ref"]
                for r in rows
                if r["dtype"] == dt and "fallback_rel_err_vs_f32_ref" in r
            )
            for dt in ("float32", "bfloat16")
        },
        "dispatch": dispatch,
        "gradient_rel_err": gradient,
        "timing": timing,
        "rows": rows,
        "seconds": time.perf_counter() - t0,
    }
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "ok",
                    "from_first_ok",
                    "span_ok",
                    "max_rel_err",
                    "max_fallback_rel_err",
                    "gradient_rel_err",
                    "timing",
                    "seconds",
                )
            }
        ),
        flush=True,
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

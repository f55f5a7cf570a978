"""Does a decode step's cache write reuse the storage's buffer, or copy the whole storage?

MLX writes ``storage[:, :, i] = k`` into the old buffer only when nothing else holds it when the
write runs (donation); otherwise it copies the whole storage first. A pipelined decode loop (the
next step queued before the last one is read, as lmx's step loop does) can keep the old storage
alive. This times one layer's write of keys and values into a (1, 8, S, 128) bf16 storage plus a
one-query attention over it, S = 8,192 (16 MiB an array), queued one step ahead, four ways:

- ``setitem``: the eager step's write (``__setitem__``) and attention over a prefix view (lmx's
  eager and segmented steps); ``setitem-whole``: attention over the whole storage instead;
- ``dynamic``: ``mx.slice_update`` at an index array, eager, attention over the whole storage;
- ``compiled``: the same inside ``mx.compile`` (lmx's compiled step);
- ``compiled-view``: compiled, attention over a view of the written storage.

A copy shows as peak memory (a second storage) and as time a step that grows with S (two 16 MiB
copies a step; on the CPU MLX's masked attention over the whole storage grows with S too).
Attention is MLX's (``mx.fast.scaled_dot_product_attention``) over the slots in use, or lmx's CUDA
kernel over its span where ``--lmx-kernel`` (a CUDA GPU).

    python benchmarks/cache_write_donation.py --json out.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import lmx.runtime  # noqa: F401  # isort: skip  (first: BLAS set-up before mlx.core)
import mlx.core as mx

from lmx.kernels import cuda_attention


def attend(q: mx.array, k: mx.array, v: mx.array, span: mx.array | None, lmx_kernel: bool) -> mx.array:
    if lmx_kernel:
        return cuda_attention.decode_attention_span(q, k, v, 0.088, span)
    slot = mx.arange(k.shape[2])
    mask = ((slot >= span[0]) & (slot < span[1]))[None, None, None]
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=0.088, mask=mask)


def run(way: str, size: int, steps: int, lmx_kernel: bool) -> dict[str, float]:
    shape = (1, 8, size, 128)
    ks, vs = mx.zeros(shape, mx.bfloat16), mx.zeros(shape, mx.bfloat16)
    q = mx.random.normal((1, 16, 1, 128)).astype(mx.bfloat16)
    new = mx.random.normal((1, 8, 1, 128)).astype(mx.bfloat16)
    mx.eval(ks, vs, q, new)

    def dynamic(ks: mx.array, vs: mx.array, index: mx.array) -> tuple[mx.array, ...]:
        start = index.reshape(1)
        ks = mx.slice_update(ks, new, start, axes=(2,))
        vs = mx.slice_update(vs, new, start, axes=(2,))
        span = mx.stack([mx.zeros_like(index), index + 1]).astype(mx.int32)
        return ks, vs, attend(q, ks, vs, span, lmx_kernel)

    def dynamic_view(ks: mx.array, vs: mx.array, index: mx.array) -> tuple[mx.array, ...]:
        start = index.reshape(1)
        ks = mx.slice_update(ks, new, start, axes=(2,))
        vs = mx.slice_update(vs, new, start, axes=(2,))
        span = mx.stack([mx.zeros_like(index), index + 1]).astype(mx.int32)
        return ks, vs, attend(q, ks[:, :, : size - 1], vs[:, :, : size - 1], span, lmx_kernel)

    compiled = mx.compile(dynamic)
    compiled_view = mx.compile(dynamic_view)
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    stamps, pending = [], None
    with cuda_attention.inference():
        for i in range(steps):
            at = i % (size - 2)
            if way.startswith("setitem"):
                ks[:, :, at : at + 1] = new
                vs[:, :, at : at + 1] = new
                span = mx.array([0, at + 1], dtype=mx.int32)
                if way == "setitem":  # attention over a view of the slots in use, as the eager step
                    out = attend(q, ks[:, :, : at + 1], vs[:, :, : at + 1], span, lmx_kernel)
                else:  # over the storage itself, as the compiled step
                    out = attend(q, ks, vs, span, lmx_kernel)
            else:
                fn = {"dynamic": dynamic, "compiled": compiled, "compiled-view": compiled_view}[way]
                ks, vs, out = fn(ks, vs, mx.array(at, dtype=mx.int32))
            mx.async_eval(out)
            if pending is not None:
                pending.item()  # the step before: one step queued ahead, as the step loop runs
                stamps.append(time.perf_counter())
            pending = out[0, 0, 0, 0]
    pending.item()
    gaps = [b - a for a, b in itertools.pairwise(stamps)][10:]
    return {
        "us_per_step": statistics.median(gaps) * 1e6,
        "peak_over_start_mib": (mx.get_peak_memory() - base) / 2**20,
        "storage_mib_each": ks.nbytes / 2**20,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1024,8192")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lmx-kernel", action="store_true", help="lmx's CUDA attention over the span (a CUDA GPU)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    out: dict = {"device": str(mx.default_device()), "mlx": mx.__version__, "runs": {}}
    for size in (int(s) for s in args.sizes.split(",")):
        for way in ("setitem", "setitem-whole", "dynamic", "compiled", "compiled-view"):
            r = run(way, size, args.steps, args.lmx_kernel)
            out["runs"][f"{way}_{size}"] = r
            print(
                f"S={size:5d} {way:14} {r['us_per_step']:8.1f} us/step  peak +{r['peak_over_start_mib']:.0f} MiB",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

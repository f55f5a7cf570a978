"""lmx's CPU kernels one product at a time: the 270M's matrix shapes and block types, 1 and 2 threads.

Random blocks of each shape (values do not change the speed), one row of x (the decode case);
medians of ``--repeat`` timed calls; GB/s counts the weight bytes read.

Usage::

    PYTHONPATH=src .venv/bin/python benchmarks/cpu_kernels_products.py --repeat 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

# (type, rows, k): the tied head and one layer's products of the bundled Gemma 3 270M Q4_K_M
SHAPES = [
    (T.Q8_0, 262144, 640),  # head / embedding
    (T.Q5_0, 2048, 640),  # gate, up
    (T.Q6_K, 640, 2048),  # down
    (T.Q4_K, 640, 1024),  # o
    (T.Q5_0, 1024, 640),  # q
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=20)
    args = p.parse_args()
    from lmx.kernels import load_module

    kernels, reason = load_module()
    if kernels is None:
        print(f"CPU kernels unavailable: {reason}", file=sys.stderr)
        return 1
    rng = np.random.default_rng(0)
    for threads in (1, 2):
        kernels.set_num_threads(threads)
        for qtype, rows, k in SHAPES:
            block, size = GGML_QUANT_SIZES[qtype]
            w = mx.array(rng.integers(0, 120, size=(rows, k // block * size), dtype=np.uint8))
            x = mx.array(rng.standard_normal((1, k)).astype(np.float32))
            mx.eval(w, x, kernels.qmatmul(x, w, int(qtype), k))
            times = []
            for _ in range(args.repeat):
                start = time.perf_counter()
                mx.eval(kernels.qmatmul(x, w, int(qtype), k))
                times.append(time.perf_counter() - start)
            t = statistics.median(times)
            print(
                f"{qtype.name:5} {rows:6} x {k:4}  threads {threads}: {t * 1e3:7.3f} ms  {w.nbytes / t / 1e9:5.2f} GB/s"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does ``mx.async_eval`` let other Python threads run while MLX queues a graph?

    python benchmarks/async_eval_gil.py [--ops 20000] [--trials 3] [--device cpu|gpu]

The step thread (:mod:`lmx.generate.encoder`) pays only if MLX releases Python's lock while it
queues a step. A thread counts in a Python loop while the main thread queues a chain of
``--ops`` additions; then it counts alone for as long. Equal counts: the lock was released.
"""

from __future__ import annotations

import argparse
import threading
import time

import lmx.runtime  # noqa: F401  # isort: skip  (first: BLAS set-up before mlx.core)
import mlx.core as mx


def chain(stream: mx.Stream, n: int) -> mx.array:
    with mx.stream(stream):
        x = mx.ones((4,))
        for _ in range(n):
            x = x + 1
    return x


def count_while(work) -> int:
    """How far a Python loop counts on another thread while ``work()`` runs (plus 50 ms)."""
    stop, counted = threading.Event(), []

    def spin() -> None:
        c = 0
        while not stop.is_set():
            c += 1
        counted.append(c)

    t = threading.Thread(target=spin)
    t.start()
    time.sleep(0.05)
    work()
    stop.set()
    t.join()
    return counted[0]


def queue(y: mx.array, span: list[float]) -> None:
    """Queue ``y``; its time in ``span[0]``."""
    t0 = time.perf_counter()
    mx.async_eval(y)
    span[0] = time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", type=int, default=20000)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    args = p.parse_args()
    stream = mx.new_thread_unsafe_stream(mx.gpu if args.device == "gpu" else mx.cpu)
    for _ in range(args.trials):
        y = chain(stream, args.ops)
        span = [0.0]
        during = count_while(lambda y=y, span=span: queue(y, span))
        alone = count_while(lambda span=span: time.sleep(span[0]))
        mx.eval(y)
        print(f"async_eval {1e3 * span[0]:.1f} ms: the other thread counted {during:,} (alone {alone:,})")


if __name__ == "__main__":
    main()

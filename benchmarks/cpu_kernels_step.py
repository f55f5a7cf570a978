"""Where a decode step of Gemma 3 270M on lmx's CPU kernels spends its time: whole step, layers, head.

One process, the bundled GGUF on the kernels; medians of ``--repeat`` timed calls each. The head is
timed on a random hidden state, the layers as ``model.hidden`` on one token (the cache grows by one
position a call, which changes nothing measurable at these lengths).

``--spins 0,200 --rounds 5`` compares how long the kernels' threads poll for the next job before
they sleep (microseconds), taking turns round by round in this one process.

Usage::

    PYTHONPATH=src .venv/bin/python benchmarks/cpu_kernels_step.py --repeat 30
    PYTHONPATH=src .venv/bin/python benchmarks/cpu_kernels_step.py --repeat 30 --spins 0,200 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import lmx  # isort: skip  (first: loads OpenBLAS before mlx.core)
import mlx.core as mx

from lmx.generate.step import eager_step


def hidden_step(model: Any, token: mx.array, cache: list[Any]) -> mx.array:
    """The layers of a decode step, built as the engine builds them (inside the ops' inference())."""
    with model.ops.inference():
        return model.hidden(token, cache)


def median_ms(fn: Callable[[], mx.array], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--spins", default="", help="comma-separated poll times (microseconds) to compare")
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args()
    engine = lmx.load(None, device="cpu", cpu_kernels=True)
    model = engine.loaded.model
    cache = model.make_cache()
    mx.eval(model(mx.array([list(range(100, 100 + args.prompt_tokens))]), cache))
    token = mx.array([[200]])
    hidden = mx.random.normal((1, 1, model.args.hidden_size))
    mx.eval(hidden)
    from lmx.kernels import load_module

    kernels, _ = load_module()
    spins = [int(v) for v in args.spins.split(",") if v] or [None]
    steps: dict[int | None, list[float]] = {spin: [] for spin in spins}
    for _ in range(args.rounds):
        for spin in spins:
            label = "" if spin is None else f"spin {spin:4d} us  "
            if spin is not None:
                kernels.set_pool_spin(spin)
            step = median_ms(lambda: eager_step(model, token[0], cache, None), args.repeat)
            head = median_ms(lambda: model.head(hidden), args.repeat)
            layers = median_ms(lambda: hidden_step(model, token, cache), args.repeat)
            steps[spin].append(step)
            print(
                f"{label}decode step {step:.2f} ms  layers {layers:.2f} ms  head {head:.2f} ms"
                f"  (medians of {args.repeat})"
            )
    if args.rounds > 1:
        for spin, values in steps.items():
            print(f"spin {spin} us: median decode step over {args.rounds} rounds {statistics.median(values):.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

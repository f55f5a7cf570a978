"""What a speculative verify pass of L positions costs against a one-token decode step.

The bundled Gemma 3 270M (GGUF, lmx's CPU kernels on the CPU), a 300-token context in the
cache; each round times a forward pass (all layers and the LM head over every position) of
L = 1..8 positions, the lengths interleaved and their order rotating, and drops the positions
again. A verify pass of k drafts is L = k + 1; it pays off when the tokens it gives (accepted
drafts + 1) over its cost beat one token per decode step.

    python benchmarks/verify_cost.py --rounds 5 [--json out.json] [--kernels /tmp/base/_lmx_kernels*.so]

``--kernels`` runs another build of the CPU kernels (e.g. the ``main`` branch's module copied aside)
instead of this tree's, to compare kernels before/after on the same machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import lmx  # noqa: F401  # isort: skip  (loads OpenBLAS before mlx.core)
import mlx.core as mx

from lmx.loading import load_model


def use_kernels(path: str) -> None:
    """Make lmx load the kernel module built at ``path`` instead of its own."""
    import importlib.util

    import lmx.kernels

    spec = importlib.util.spec_from_file_location("lmx_other_build._lmx_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.set_num_threads(lmx.kernels.load_module()[0].num_threads())
    lmx.kernels.load_module = lambda: (module, None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--lengths", default="1,2,3,4,5,6,7,8,9")
    ap.add_argument("--json", default=None)
    ap.add_argument("--kernels", default=None, help="path of another build's _lmx_kernels*.so to use")
    args = ap.parse_args()
    if args.kernels:
        use_kernels(args.kernels)
    lengths = [int(x) for x in args.lengths.split(",")]
    model = load_model(None).model
    cache = model.make_cache()
    model.head(model.hidden(mx.array([list(range(1000, 1300))]), cache)[:, -1:])
    mx.eval([c.state for c in cache])
    times: dict[int, list[float]] = {n: [] for n in lengths}
    for r in range(args.rounds + 1):
        order = lengths[r % len(lengths) :] + lengths[: r % len(lengths)]
        for n in order:
            t0 = time.perf_counter()
            mx.eval(model.head(model.hidden(mx.array([[5] * n]), cache)))
            dt = time.perf_counter() - t0
            for c in cache:
                c.trim(n)
            if r:  # round 0 warms up
                times[n].append(dt)
    one = statistics.median(times[lengths[0]])
    out = {n: {"ms": 1e3 * statistics.median(t), "vs_one_step": statistics.median(t) / one} for n, t in times.items()}
    for n, v in out.items():
        print(f"L={n}: {v['ms']:.1f} ms  ({v['vs_one_step']:.2f} decode steps)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rounds": args.rounds, "positions": out}, f, indent=2)


if __name__ == "__main__":
    main()

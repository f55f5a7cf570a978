"""The compiled decode step against the segmented one at a short and a long cache: time a step and
peak memory. A compiled step whose cache writes copied the storage would show a higher peak (a
second storage per layer) and a slower step at the long cache.

A Qwen 3 0.6B shape cut to 4 layers with a 1,024-token vocabulary (so the head does not hide the
cache), float32, random weights; ``--thread`` queues each step on the step thread as a GPU does.

    python benchmarks/compiled_step_storage.py [--thread] [--device cpu|gpu]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

import lmx.runtime  # noqa: F401  # isort: skip  (first: BLAS set-up before mlx.core)
import mlx.core as mx

from lmx.bench import config_for, random_weights
from lmx.generate.sampling import KeySequence, make_sampler
from lmx.generate.step import DecodeState, generate_step
from lmx.models import build_model
from lmx.runtime.profile import StepPlan


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--thread", action="store_true", help="queue each step on the step thread")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--lengths", default="64,6000")
    args = p.parse_args()
    mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    config = config_for("qwen3-0.6b", num_layers=4)
    config["vocab_size"] = 1024
    model = build_model(config)
    random_weights(model, mx.float32)
    mx.eval(model.parameters())
    for n in (int(x) for x in args.lengths.split(",")):
        for mode in ("segmented", "compiled"):
            state = DecodeState(model, StepPlan(decode_mode=mode, encode_thread=args.thread))
            prompt = mx.array([[i % 1000 + 2 for i in range(n)]])
            mx.reset_peak_memory()
            steps = generate_step(
                model, prompt, model.make_cache(), make_sampler(0.0), KeySequence(0).next, state=state
            )
            stamps = []
            for i, (token, _) in enumerate(steps):
                token.item()
                stamps.append(time.perf_counter())
                if i == 40:
                    break
            steps.close()
            gaps = sorted(b - a for a, b in itertools.pairwise(stamps[10:]))
            print(
                f"{'thread' if args.thread else 'one thread'} {n:5d} positions {mode:9} "
                f"{gaps[len(gaps) // 2] * 1e3:7.2f} ms a step, peak {mx.get_peak_memory() // 2**20} MiB",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Concurrent streams on one engine, in process: aggregate tokens/s, time to first token, and
where the scheduler's loop spends its time.

    python benchmarks/engine_load.py [--model PATH] [--device cpu|gpu] [--clients 32]
        [--duration 20] [--max-tokens 128] [--mixed] [--max-batch 32] [--json out.json]

Like ``server_load.py`` without HTTP: ``--clients`` threads each stream requests back to back
(a different prompt each time; ``--mixed`` cycles through the same four sampling settings) for
``--duration`` seconds, then let their last request finish. Prints one JSON object with the
scheduler's counts (steps, batched steps, largest batch) and the seconds of each phase of its
loop (decode: building and queueing a step; prefill; emit: waiting for a step's tokens and
handing them out; leave/join: rows leaving and joining).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from typing import Any

import lmx

TOPICS = ["the ocean", "a lighthouse", "mountains", "a library", "rain", "trains", "bees", "the moon"]
MIXED = [
    {"temperature": 0},
    {"temperature": 0.8, "top_p": 0.9, "seed": 1},
    {"temperature": 1.0, "top_p": 0.95},
    {"temperature": 0, "frequency_penalty": 0.3, "presence_penalty": 0.2},
]


def split_decode() -> dict[str, float]:
    """Time the three parts of the scheduler's decode phase (its host work; the device runs in the
    background): building the model's step graph, building the sampling graph, queueing both
    (``mx.async_eval``: encoding every op for the device; on the CPU it also waits while MLX's
    queue is full). Wraps the scheduler's names in place."""
    from lmx.generate.step import Decoder
    from lmx.scheduler import core

    seconds = {"model_graph": 0.0, "sampling_graph": 0.0, "decode": 0.0}

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                seconds[name] += time.perf_counter() - t

        return wrapper

    Decoder.__call__ = timed("model_graph", Decoder.__call__)
    core.sample_rows = timed("sampling_graph", core.sample_rows)
    core.Scheduler._queue_decode = timed("decode", core.Scheduler._queue_decode)
    return seconds  # queueing: decode - model_graph - sampling_graph


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--device", default=None, choices=["cpu", "gpu"])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--mixed", action="store_true")
    p.add_argument("--profile", type=int, default=0, help="print the scheduler thread's N costliest functions")
    p.add_argument("--split", action="store_true", help="split the decode phase: model graph, sampling, queueing")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    split = split_decode() if args.split else None
    engine = lmx.load(args.model, device=args.device, max_batch=args.max_batch)
    engine.generate("warm up", max_tokens=4)
    ttfts: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + args.duration

    def client(n: int) -> None:
        i = 0
        while time.monotonic() < stop_at:
            opts = dict(MIXED[(n + i) % len(MIXED)]) if args.mixed else {}
            if "seed" in opts:
                opts["seed"] = n * 1000 + i
            prompt = f"Request {i} of client {n}. A short paragraph about {TOPICS[(n + i) % len(TOPICS)]}:"
            t0 = time.perf_counter()
            first = None
            count = 0
            for _ in engine.stream(prompt, max_tokens=args.max_tokens, **opts):
                if first is None:
                    first = time.perf_counter() - t0
                count += 1
            with lock:
                ttfts.append(first or 0.0)
                tokens[0] += count
            i += 1

    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        engine.run_exclusive(profiler.enable)  # runs on the scheduler's thread: profiles it
    t_start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t_start
    if profiler is not None:
        import pstats

        engine.run_exclusive(profiler.disable)
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(args.profile)
    stats = engine.stats()
    ttfts.sort()
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "command": " ".join(["python", *sys.argv]),
        "device": engine.info().device,
        "requests": len(ttfts),
        "tokens": tokens[0],
        "wall_s": wall,
        "tokens_per_s": tokens[0] / wall,
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_p99_s": ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))],
        "steps": stats.steps,
        "batched_steps": stats.batched_steps,
        "max_batch_seen": stats.max_batch_seen,
        "seconds": {k: round(v, 3) for k, v in stats.seconds.items()},
        "prefix_hits": stats.prefix.hits,
    }
    if split is not None:
        split["queue"] = split.pop("decode") - split["model_graph"] - split["sampling_graph"]
        result["decode_split_seconds"] = {k: round(v, 3) for k, v in split.items()}
    engine.close()
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

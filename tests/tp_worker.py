"""Run by each process of a tensor- or pipeline-parallel test under ``mlx.launch``: load, generate greedily, report.

Usage: ``tp_worker.py OUT_DIR JSON`` with JSON ``{"model", "prompts", "max_tokens", "tensor_parallel"}``
(or ``"pipeline_parallel"``);
writes ``OUT_DIR/rank<r>.json`` (the tokens of every prompt, what ``info()`` says, memory).
"""

from __future__ import annotations

import lmx  # first: it routes MLX's BLAS to OpenBLAS before mlx.core loads  # isort: skip

import faulthandler
import json
import os
import resource
import signal
import sys

import mlx.core as mx


def _rss() -> int:
    """Resident bytes now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main() -> None:
    faulthandler.register(signal.SIGUSR1)  # a stuck rank shows where it is (kill -USR1)
    out, values = sys.argv[1], json.loads(sys.argv[2])
    engine = lmx.load(
        values.get("model"),
        tensor_parallel=values.get("tensor_parallel"),
        pipeline_parallel=values.get("pipeline_parallel"),
        cpu_kernels=False,
    )
    record = _describe(engine)
    with open(f"{out}/rank{record['rank']}.pid", "w") as f:
        f.write(str(os.getpid()))  # for a test that kills a rank
    try:
        if not engine.is_leader:
            engine.follow()  # runs rank 0's requests until rank 0 closes its engine
        else:
            with engine:
                record["tokens"] = [
                    engine.generate(p, max_tokens=values["max_tokens"], temperature=0.0, seed=values.get("seed")).tokens
                    for p in values["prompts"]
                ]
    except lmx.LmxError as e:
        print(f"rank {record['rank']}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.exit(3)
    stats = engine.scheduler.stats()  # what this rank ran (a follower: rank 0's requests, replayed)
    record.update(completed=stats.completed, steps=stats.steps, rss_end=_rss())
    with open(f"{out}/rank{record['rank']}.json", "w") as f:
        json.dump(record, f)


def _describe(engine: lmx.Engine) -> dict:
    from mlx.utils import tree_flatten

    info = engine.info()
    params = tree_flatten(engine.model.parameters())
    return {
        "layer_bytes": sum(v.nbytes for k, v in params if ".layers." in f".{k}"),
        "param_names": sorted(k for k, _ in params if ".layers." not in f".{k}"),
        "rank": 0 if info.tensor_parallel is None else info.tensor_parallel["rank"],
        "tensor_parallel": info.tensor_parallel,
        "weights_bytes": info.weights_bytes,
        "num_parameters": info.num_parameters,
        "active_memory": mx.get_active_memory(),
        "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss": _rss(),
    }


if __name__ == "__main__":
    main()

"""Run by each process of a tensor-parallel test under ``mlx.launch``: load, generate greedily, report.

Usage: ``tp_worker.py OUT_DIR JSON`` with JSON ``{"model", "prompts", "max_tokens", "tensor_parallel"}``;
writes ``OUT_DIR/rank<r>.json`` (the tokens of every prompt, what ``info()`` says, memory).
"""

from __future__ import annotations

import json
import resource
import sys

import mlx.core as mx

import lmx


def _rss() -> int:
    """Resident bytes now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main() -> None:
    out, values = sys.argv[1], json.loads(sys.argv[2])
    with lmx.load(values.get("model"), tensor_parallel=values.get("tensor_parallel"), cpu_kernels=False) as engine:
        tokens = [
            engine.generate(p, max_tokens=values["max_tokens"], temperature=0.0, seed=values.get("seed")).tokens
            for p in values["prompts"]
        ]
        info = engine.info()
        rank = 0 if info.tensor_parallel is None else info.tensor_parallel["rank"]
        record = {
            "tokens": tokens,
            "tensor_parallel": info.tensor_parallel,
            "weights_bytes": info.weights_bytes,
            "num_parameters": info.num_parameters,
            "active_memory": mx.get_active_memory(),
            "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rss": _rss(),
        }
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main()

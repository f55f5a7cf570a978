"""One decode step of B rows on the CPU, unpadded against left-padded (rows that joined a batch at
different times), the bundled Gemma 3 270M unless ``--model`` names another.

    python benchmarks/cpu_padded_step.py [--model PATH] [--rows 8] [--prompt-tokens 60] [--steps 20] [--rounds 3]
        [--kv-bits 8|4]

Each round prefills the rows (padded: row b left-padded by b % 3 positions), then times ``--steps``
one-token steps (``eager_step``, evaluated each), and prints the median of each layout. It also
prints the step's op counts by kind (MLX's ``export_to_dot``), which say which path the padded rows
took: lmx's fused decode-layer ops and one attention op a layer, or MLX's masked attention.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

import lmx  # isort: skip  (loads OpenBLAS before mlx.core)
import mlx.core as mx

from lmx.generate.step import eager_step, prefill
from lmx.models.cache import kv_quant


def op_counts(logits: mx.array) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".dot") as f:
        mx.export_to_dot(f.name, logits)
        counts = collections.Counter(re.findall(r'label ?= ?"([A-Za-z_]+)', Path(f.name).read_text()))
    return dict(counts.most_common())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=60)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--kv-bits", type=int, default=None, help="a quantized KV cache (8 or 4 bits, group 64)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    engine = lmx.load(args.model, device="cpu")
    model = engine.loaded.model
    quant = kv_quant(args.kv_bits, 64, model.args.head_dim) if args.kv_bits else None
    rows, length = args.rows, args.prompt_tokens
    tokens = mx.array([[1000 + (r * 7 + j) % 500 for j in range(length)] for r in range(rows)])

    def step_ms(padded: bool) -> tuple[float, dict[str, int]]:
        cache = model.make_cache(quant)
        pad = mx.array([r % 3 for r in range(rows)], dtype=mx.int32) if padded else None
        mx.eval(prefill(model, tokens, cache, pad, 128), [c.state for c in cache])
        step_tokens = mx.array([5] * rows)
        times, ops = [], {}
        for i in range(args.steps):
            t = time.perf_counter()
            logits = eager_step(model, step_tokens, cache, pad)
            if i == 0:
                ops = op_counts(logits)
            mx.eval(logits)
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1000, ops

    result: dict = {
        "model": args.model or "bundled Gemma 3 270M",
        "rows": rows,
        "prompt_tokens": length,
        "kv_bits": args.kv_bits,
        "rounds": [],
    }
    for r in range(args.rounds):
        unpadded, ops_unpadded = step_ms(False)
        padded, ops_padded = step_ms(True)
        result["rounds"].append({"unpadded_ms": round(unpadded, 2), "padded_ms": round(padded, 2)})
        print(f"round {r + 1}: unpadded {unpadded:.1f} ms, padded {padded:.1f} ms", flush=True)
    result["ops_unpadded"], result["ops_padded"] = ops_unpadded, ops_padded
    print("ops, padded step:", ops_padded)
    engine.close()
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""On the device: rows sampled in one batch choose what each chooses alone (MLX's sampling ops).

The test suite checks this on the CPU (``tests/test_sampling.py``); this runs the same comparison on
whatever device MLX picks (a GPU's sort, softmax, cumulative sum and draw kernels), with a Gemma
vocabulary: 8 rows of mixed settings (seeded rows with the same settings filtered and drawn together,
penalty rows written back), 16 steps. Prints one JSON line; exit status 1 if a row differs.

    python3 benchmarks/sampling_rows_check.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import lmx  # noqa: F401  # isort: skip
import mlx.core as mx

from lmx.generate.options import GenerationOptions
from lmx.generate.row import RowSampler, sample_rows
from lmx.runtime.ops import MLX_OPS

ROWS = [
    {"temperature": 0.8, "top_p": 0.9, "seed": 1},
    {"temperature": 0},
    {"temperature": 0.8, "top_p": 0.9, "seed": 2},
    {"temperature": 0, "frequency_penalty": 0.3, "presence_penalty": 0.2},
    {"temperature": 1.0, "top_k": 50, "min_p": 0.01, "seed": 3},
    {"temperature": 0.8, "top_p": 0.9, "seed": 4},
    {"temperature": 0.7, "repetition_penalty": 1.3, "seed": 5},
    {"temperature": 0, "frequency_penalty": 0.3, "presence_penalty": 0.2},
]


def main() -> int:
    width, steps = 262144, 16

    def make() -> list[RowSampler]:
        return [RowSampler(GenerationOptions(**o), [5, 9, 9, 40], None, MLX_OPS) for o in ROWS]

    batched, alone = make(), make()
    differ: list[list[int]] = []
    max_lp = 0.0
    for step in range(steps):
        logits = (mx.random.normal((len(ROWS), width), key=mx.random.key(step)) * 3).astype(mx.bfloat16)
        tokens, logprobs = sample_rows(logits, batched, MLX_OPS)
        for i, row in enumerate(alone):
            one, one_lp = sample_rows(logits[i : i + 1], [row], MLX_OPS)
            if tokens[i].item() != one.item():
                differ.append([step, i])
            max_lp = max(max_lp, mx.abs(logprobs[i] - one_lp[0]).max().item())
    print(json.dumps({"device": str(mx.default_device()), "rows_differ": differ, "max_logprob_diff": max_lp}))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())

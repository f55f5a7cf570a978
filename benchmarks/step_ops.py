"""One decode step of the bundled model on the CPU (lmx.load() default): its graph ops (exact) and host build time.

For refactors that must not change speed: run it from two source trees and compare (see
ab_source_trees.sh and RESULTS.md, "Refactor check").
"""

import collections
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

import lmx  # isort: skip
import mlx.core as mx

from lmx.generate.step import eager_step, prefill

engine = lmx.load(device="cpu")
m = engine.loaded.model
cache = m.make_cache()
tok = mx.argmax(prefill(m, mx.array([list(range(100, 164))]), cache), axis=-1)
mx.eval(tok)


def build(t):
    return eager_step(m, t, cache, None)  # as the engine builds a decode step


logits = build(tok)
with tempfile.NamedTemporaryFile(suffix=".dot") as f:
    mx.export_to_dot(f.name, logits)
    ops = collections.Counter(re.findall(r'label ?= ?"([A-Za-z_]+)', Path(f.name).read_text()))
tok = mx.argmax(logits, axis=-1)
mx.eval(tok)
builds, steps = [], []
for _ in range(60):
    t0 = time.perf_counter()
    logits = build(tok)
    t1 = time.perf_counter()
    tok = mx.argmax(logits, axis=-1)
    mx.eval(tok)
    builds.append(t1 - t0)
    steps.append(time.perf_counter() - t0)
print(
    json.dumps(
        {
            "ops_per_step": sum(ops.values()),
            "ops": dict(sorted(ops.items())),
            "build_us_median": statistics.median(builds) * 1e6,
            "step_ms_median": statistics.median(steps) * 1e3,
        }
    )
)

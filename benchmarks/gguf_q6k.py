"""Q6_K re-quantized to MLX's 8-bit affine layout (issue 17 part 3): what it costs in perplexity.

``gguf_on_device="quantized"`` holds a GGUF's Q6_K matrices in 8 bits, groups of 32, each value within
an eighth of its coarser sub-block's Q6_K step (:mod:`lmx.io.gguf_quants`); every other type maps
exactly. This runs ``lmx eval`` of the bundled Gemma 3 270M on kv_quant.py's fixed text with the
float load (every matrix dequantized exactly) and the quantized one, both on the CPU in float32
without lmx's kernels (``LMX_CPU_KERNELS=0``), and reports the perplexity change.

    python benchmarks/gguf_q6k.py > benchmarks/gguf_q6k_cpu_<date>.json
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kv_quant  # this folder: the fixed text, its pieces, `lmx eval`

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lmx.loading.default_model import default_gguf_path


def main() -> int:
    os.environ["LMX_CPU_KERNELS"] = "0"
    runs = {}
    for mode in ("float", "quantized"):
        os.environ["LMX_GGUF_ON_DEVICE"] = mode
        runs[mode] = kv_quant.perplexity(["none"], ["--model", str(default_gguf_path())])["runs"]["none"]
        runs[mode].pop("perplexity_change")  # against itself: 0
        print(mode, json.dumps(runs[mode]), file=sys.stderr, flush=True)
    change = runs["quantized"]["perplexity"] / runs["float"]["perplexity"] - 1.0
    print(
        json.dumps(
            {
                "text": str(kv_quant.TEXT),
                "command": "LMX_CPU_KERNELS=0 LMX_GGUF_ON_DEVICE={float,quantized} lmx eval --model <bundled .gguf> "
                "--data <pieces>.jsonl "
                "--batch-size 1 --max-seq-len 4096 --json",
                "runs": runs,
                "perplexity_change": change,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

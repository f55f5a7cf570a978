"""Copy a model directory with random weights: same config, tokenizer and tensor shapes.

    python benchmarks/random_like.py SRC_DIR OUT_DIR [--dtype bfloat16] [--seed 0]

For speed benchmarks on a machine the real weights cannot reach (the GPU machine takes
64 MiB per call; the bundled Gemma 3 270M is 253 MB as GGUF): the config, the tokenizer
files and so the prompts and token counts are the real model's, and every tensor has its
real shape and the chosen dtype, so the bytes read and the kernels run are the same. The
text generated is noise: use it for timings only.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import lmx.runtime  # noqa: E402, F401  # isort: skip  (first: BLAS set-up before mlx.core)
import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from lmx.bench import random_weights  # noqa: E402
from lmx.models import build_model  # noqa: E402

COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    config = json.loads((args.src / "config.json").read_text())
    model = build_model(config, str(args.src / "config.json"))
    random_weights(model, getattr(mx, args.dtype), args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        if (args.src / name).is_file():
            shutil.copy2(args.src / name, args.out / name)
    mx.save_safetensors(str(args.out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    print(f"{args.out}: random {args.dtype} weights, config and tokenizer of {args.src}")


if __name__ == "__main__":
    main()

"""``lmx fuse``: merge a LoRA adapter into its base model and write a loadable model (HF directory, or
GGUF file for a GGUF base)."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fuse", help="merge a LoRA adapter into the model and save it")
    p.add_argument("--model", "-m", default=None, help="HF model dir or .gguf file (default: bundled Gemma 3 270M)")
    p.add_argument("--adapter", "-a", required=True, help="adapter dir (adapters.safetensors + adapter_config.json)")
    p.add_argument(
        "--out", "-o", required=True, help="directory to write, or a .gguf file (GGUF base: keeps its quantized blocks)"
    )
    p.add_argument("--dequantize", action="store_true", help="write quantized layers as float layers")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the base model's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lmx.train.fuse import fuse

    out = fuse(
        args.model, args.adapter, args.out, dequantize=args.dequantize, dtype=args.dtype, overwrite=args.overwrite
    )
    gguf_base = args.model is None or str(args.model).lower().endswith(".gguf")
    if gguf_base and out.suffix.lower() != ".gguf":
        print(f"note: {out} is a float directory; name --out *.gguf to keep the GGUF base's blocks", file=sys.stderr)
    print(out)
    return 0

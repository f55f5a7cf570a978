"""``lmx convert SRC OUT``: GGUF or HF dir -> HF-layout dir (optionally MLX-quantized)."""

from __future__ import annotations

import argparse
import sys

from lmx.loading.convert import Q_BITS, Q_GROUP_SIZES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a GGUF file or HF dir into an HF-layout directory")
    p.add_argument("src", help="a .gguf file or an HF model directory")
    p.add_argument("out", help="the directory to write (built in a temp dir, then renamed); not a .gguf file")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("-q", "--quantize", action="store_true", help="store weights MLX-quantized (affine)")
    p.add_argument("--q-bits", type=int, default=4, choices=Q_BITS)
    p.add_argument("--q-group-size", type=int, default=64, choices=Q_GROUP_SIZES)
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from lmx.loading.convert import convert

    with tqdm(total=0, unit="tensor", desc="writing", file=sys.stderr) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        out = convert(
            args.src,
            args.out,
            dtype=args.dtype,
            q_bits=args.q_bits if args.quantize else None,
            q_group_size=args.q_group_size,
            overwrite=args.overwrite,
            progress=progress,
        )
    print(out)
    return 0

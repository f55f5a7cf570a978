"""``lmx convert SRC OUT``: GGUF or HF dir -> HF-layout dir (optionally MLX-quantized), or a GGUF file."""

from __future__ import annotations

import argparse
import sys

from lmx.loading.convert import Q_BITS, Q_GROUP_SIZES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="convert a GGUF file or HF dir into an HF-layout directory, or (OUT ending .gguf) a GGUF file"
    )
    p.add_argument("src", help="a .gguf file or an HF model directory")
    p.add_argument(
        "out",
        help="the directory to write, or a .gguf file (llama.cpp's layout and tokenizer metadata; "
        "written to a temporary, then renamed)",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="weight dtype (GGUF: the matrices' type F32/BF16/F16; norms stay F32)",
    )
    p.add_argument(
        "-q",
        "--quantize",
        action="store_true",
        help="store weights MLX-quantized (affine); for a .gguf OUT: Q8_0 (needs --q-bits 8)",
    )
    p.add_argument("--q-bits", type=int, default=4, choices=Q_BITS, help="bits per weight (a .gguf OUT: 8 only)")
    p.add_argument(
        "--q-group-size",
        type=int,
        default=64,
        choices=Q_GROUP_SIZES,
        help="quantization group size (a directory OUT; Q8_0 blocks are 32 values)",
    )
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

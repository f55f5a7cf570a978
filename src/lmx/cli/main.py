"""Entry point of the ``lmx`` command."""

from __future__ import annotations

import argparse
import logging
import sys

from lmx.cli import bench, chat, classify, convert, fuse, generate, info, serve, train
from lmx.cli import eval as eval_cmd

# Explicit list of commands: name -> module with register(subparsers).
COMMANDS = {
    "generate": generate,
    "chat": chat,
    "info": info,
    "convert": convert,
    "serve": serve,
    "train": train,
    "fuse": fuse,
    "eval": eval_cmd,
    "classify": classify,
    "bench": bench,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmx", description="Run, serve and fine-tune Gemma 3 and Qwen 3 on MLX.")
    parser.add_argument("--verbose", "-v", action="store_true", help="log debug messages to stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    from lmx.errors import LmxError

    try:
        return int(args.func(args) or 0)
    except LmxError as e:
        print(f"lmx: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, minus the noise: no ``(default: None)`` on flags whose help
    already says what happens when they are left out, on switches, or where the help names its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if not action.option_strings or "default" in text.lower() or not _shows_default(default):
            return text
        return f"{text} (default: %(default)s)"


def _shows_default(default: object) -> bool:
    """Whether a default says something: not None, a switch's False, SUPPRESS or an empty list (0 does)."""
    return not (default is None or default is False or default is argparse.SUPPRESS or default == [])


def build_parser() -> argparse.ArgumentParser:
    from lmx import __version__

    parser = argparse.ArgumentParser(
        prog="lmx", description="Run, serve and fine-tune Gemma 3 and Qwen 3 on MLX.", formatter_class=HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"lmx {__version__}")
    parser.add_argument("--verbose", "-v", action="store_true", help="log debug messages to stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        module.register(sub)
    for command in sub.choices.values():  # one place, so that a new command cannot forget it
        command.formatter_class = HelpFormatter
        for action in command._actions:
            if action.help is None and action.option_strings and _shows_default(action.default):
                action.help = "default: %(default)s"  # argparse prints nothing for an option without help
    return parser


def main(argv: list[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(words)
    args.argv = words  # the command's own words, for a command that runs itself again (--tensor-parallel)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    from lmx.errors import LmxError

    code = 1
    try:
        code = int(args.func(args) or 0)
    except LmxError as e:
        print(f"lmx: error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        code = 130
    finally:
        from lmx.cli.common import report_rank_status

        report_rank_status(args, code)
    return code


if __name__ == "__main__":
    sys.exit(main())

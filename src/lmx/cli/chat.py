"""``lmx chat``: an interactive conversation that keeps its history (``/reset``, ``/exit``)."""

from __future__ import annotations

import argparse
import sys

from lmx.cli.common import (
    add_model_args,
    add_sampling_args,
    chat_template_note,
    load_engine,
    print_stats,
    sampling_options,
    stream_to_stdout,
)

HELP = "commands: /reset (forget the conversation), /exit (quit)"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--once", default=None, metavar="MESSAGE", help="send one message, print the reply, exit")
    p.add_argument("--no-stats", action="store_true", help="do not print statistics after each reply")
    add_model_args(p, draft=True)
    add_sampling_args(p, max_tokens=512)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    engine = load_engine(args)
    opts = sampling_options(args)
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    interactive = args.once is None
    note = chat_template_note(engine.info())
    if note:
        print(note, file=sys.stderr)
    if interactive:
        print(f"lmx chat with {engine.info().name} - {HELP}", file=sys.stderr)
    with engine:
        while True:
            if interactive:
                try:
                    line = input(">>> ")
                except EOFError:
                    break
            else:
                line = args.once
            text = line.strip()
            if text in ("/exit", "/quit", "/bye"):
                break
            if text == "/reset":
                messages = list(start)
                print("(conversation reset)", file=sys.stderr)
                continue
            if not text:
                continue
            if text.startswith("/"):
                print(f"unknown command {text!r}; {HELP}", file=sys.stderr)
                continue
            messages.append({"role": "user", "content": text})
            stream = engine.stream_chat(messages, **opts)
            stream_to_stdout(stream)
            messages.append({"role": "assistant", "content": stream.text})
            if not args.no_stats:
                print_stats(stream.metrics)
            if not interactive:
                break
    return 0

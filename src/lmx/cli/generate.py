"""``lmx generate``: stream a completion to stdout, statistics to stderr."""

from __future__ import annotations

import argparse
import sys

from lmx.cli.common import (
    add_model_args,
    add_sampling_args,
    load_engine,
    print_stats,
    sampling_options,
    stream_to_stdout,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="complete a prompt, streaming")
    p.add_argument("prompt", nargs="?", default=None, help="the prompt; '-' or none reads stdin")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system prompt (with --chat)")
    add_model_args(p, draft=True)
    add_sampling_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    prompt = args.prompt
    if prompt is None or prompt == "-":
        prompt = sys.stdin.read()
    engine = load_engine(args)
    with engine:
        opts = sampling_options(args)
        if args.chat:
            messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
                {"role": "user", "content": prompt}
            ]
            stream = engine.stream_chat(messages, **opts)
        else:
            stream = engine.stream(prompt, **opts)
        stream_to_stdout(stream)
        print_stats(stream.metrics)
    return 0

"""``lmx generate``: stream a completion to stdout, statistics to stderr."""

from __future__ import annotations

import argparse
import sys

from lmx.cli.common import (
    add_model_args,
    add_parallel_args,
    add_sampling_args,
    launch_tensor_parallel,
    load_engine,
    parallel_size,
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
    add_parallel_args(p)
    p.add_argument("--prompt-file", default=None, help=argparse.SUPPRESS)  # the prompt, for --tensor-parallel ranks
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    prompt = args.prompt
    if args.prompt_file is not None:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompt = f.read()
    elif prompt is None or prompt == "-":
        prompt = sys.stdin.read()
    size = parallel_size(args)
    if size and size > 1 and args.prompt_file is None:
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8") as f:
            f.write(prompt)  # the ranks read stdin's prompt from here (mlx.launch gives them no stdin of ours)
            f.flush()
            code = launch_tensor_parallel(args, ["--prompt-file", f.name])
    else:
        code = launch_tensor_parallel(args)
    if code is not None:
        return code
    engine = load_engine(args)
    if not engine.is_leader:  # ranks 1.. of a split model compute rank 0's tokens, silently
        engine.follow()
        return 0
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

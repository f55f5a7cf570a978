"""Flags shared by the commands that load a model or generate."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_model_args(p: argparse.ArgumentParser, *, named_adapters: bool = False, draft: bool = False) -> None:
    p.add_argument("--model", "-m", default=None, help="HF model dir or .gguf file (default: bundled Gemma 3 270M)")
    p.add_argument("--device", choices=["cpu", "gpu"], default=None, help="default: LMX_DEVICE, else GPU if present")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16")
    if draft:  # the commands that generate
        p.add_argument(
            "--draft-model",
            default=None,
            metavar="PATH",
            help="a small model of the same vocabulary that drafts tokens for speculative decoding "
            "(greedy output unchanged; turns on --speculative draft-model)",
        )
    add_kv_args(p)
    if named_adapters:  # lmx serve: several, each picked by a request's model name
        p.add_argument(
            "--adapter",
            action="append",
            default=[],
            metavar="NAME=PATH",
            help="serve a LoRA adapter (from lmx train) beside the model; requests pick it with model=NAME "
            "(repeatable; a bare PATH is named after its directory)",
        )
        return
    p.add_argument("--adapter", default=None, help="a LoRA adapter directory to apply (from lmx train)")


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    """``--tensor-parallel N``, ``--pipeline-parallel N`` and ``--distributed-backend``, for the commands that load a model."""
    p.add_argument(
        "--tensor-parallel",
        type=int,
        default=None,
        metavar="N",
        help="split the model over N processes; run alone, lmx starts them on this host through mlx.launch "
        "(ring backend); started by mlx.launch (several hosts), it joins their group (see the README)",
    )
    p.add_argument(
        "--pipeline-parallel",
        type=int,
        default=None,
        metavar="N",
        help="split the model's layers over N processes (for fitting a model across hosts, not for speed); "
        "started as --tensor-parallel is",
    )
    p.add_argument(
        "--distributed-backend",
        default="any",
        choices=["any", "ring", "mpi", "nccl"],
        help="the mlx.distributed backend to join with --tensor-parallel or --pipeline-parallel (any: the one "
        "mlx.launch set up)",
    )
    p.add_argument("--tp-status", default=None, help=argparse.SUPPRESS)  # where ranks leave their exit codes


def report_rank_status(args: argparse.Namespace, code: int) -> None:
    """A rank started by :func:`launch_tensor_parallel` leaves its exit code for the process that started it."""
    if getattr(args, "tp_status", None) is None:
        return
    from lmx.runtime.distributed import join_group

    rank = join_group(args.distributed_backend).rank
    with open(f"{args.tp_status}/rank{rank}", "w", encoding="utf-8") as f:
        f.write(str(code))


def parallel_size(args: argparse.Namespace) -> int | None:
    """The N of ``--tensor-parallel N`` or ``--pipeline-parallel N`` (None: neither given).

    Raises:
        InvalidOptionError: both given.
    """
    tp, pp = getattr(args, "tensor_parallel", None), getattr(args, "pipeline_parallel", None)
    if tp is not None and pp is not None:
        from lmx.errors import InvalidOptionError

        raise InvalidOptionError(f"--tensor-parallel {tp} and --pipeline-parallel {pp} cannot be combined; choose one")
    return tp if tp is not None else pp


def launch_tensor_parallel(args: argparse.Namespace, extra: list[str] | None = None) -> int | None:
    """With ``--tensor-parallel N`` or ``--pipeline-parallel N`` (N > 1) in a process mlx.launch did not start: run this same command
    in N ring processes on this host through ``mlx.launch`` and return its exit code. None: go on here
    (no split asked for, or this process is one of the N).

    Args:
        args: the parsed command line (``args.argv``: its words, as :func:`lmx.cli.main.main` keeps them).
        extra: words to add to the command line the N processes get.
    """
    n = parallel_size(args)
    if n is None or n <= 1:
        return None
    from lmx.runtime.distributed import join_group, launch_command

    if join_group(args.distributed_backend).size > 1:
        return None
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="lmx-tp-") as status:
        words = [*args.argv, *(extra or []), "--tp-status", status]
        if args.distributed_backend == "any":
            words += ["--distributed-backend", "ring"]
        code = subprocess.call(launch_command(n, [sys.executable, "-m", "lmx.cli.main", *words]))
        kind = "tensor-parallel" if getattr(args, "tensor_parallel", None) is not None else "pipeline-parallel"
        return _group_exit(n, status, code, kind)


def _group_exit(n: int, status: str, launch_code: int, kind: str = "tensor-parallel") -> int:
    """The exit code of a group of ``n`` ranks (mlx.launch returns 0 whatever they returned): 0 when
    every rank finished with 0; else a message on stderr naming the ranks that did not."""
    from pathlib import Path

    codes = {}
    for rank in range(n):
        path = Path(status) / f"rank{rank}"
        codes[rank] = int(path.read_text()) if path.is_file() else None
    if launch_code == 0 and all(c == 0 for c in codes.values()):
        return 0
    failed = [f"rank {r} exited with code {c}" for r, c in codes.items() if c not in (0, None)]
    gone = [str(r) for r, c in codes.items() if c is None]
    if gone:
        failed.append(
            f"rank(s) {', '.join(gone)} ended without finishing (killed or crashed; mlx.launch stops every rank "
            "when one ends)"
        )
    print(f"lmx: error: the {kind} group of {n} failed: {'; '.join(failed)}", file=sys.stderr)
    return next((c for c in codes.values() if c not in (0, None)), 1)


def add_kv_args(p: argparse.ArgumentParser) -> None:
    """``--kv-bits`` and ``--kv-group-size``: a quantized KV cache (see :func:`lmx.load`)."""
    p.add_argument(
        "--kv-bits",
        type=int,
        default=None,
        help="keep the KV cache quantized to 8 or 4 bits (default: LMX_KV_BITS, unset: float)",
    )
    p.add_argument(
        "--kv-group-size", type=int, default=64, help="elements per scale of a quantized KV cache: 32, 64 or 128"
    )


def add_sampling_args(p: argparse.ArgumentParser, *, max_tokens: int = 256) -> None:
    p.add_argument("--max-tokens", "-n", type=int, default=max_tokens)
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    add_speculative_args(p)


def add_speculative_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--speculative",
        choices=["prompt-lookup", "draft-model"],
        default=None,
        help="speculative decoding for greedy requests: draft from the prompt (prompt-lookup) or a --draft-model, "
        "verify in one pass; output unchanged",
    )
    p.add_argument("--num-draft-tokens", type=int, default=None, help="tokens drafted per pass (default 4)")


def sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
        "presence_penalty": args.presence_penalty,
        "frequency_penalty": args.frequency_penalty,
        "seed": args.seed,
        "stop": args.stop,
        # only when given: the engine's default (draft-model with --draft-model) holds otherwise
        **({"speculative": args.speculative} if args.speculative else {}),
        **({"num_draft_tokens": args.num_draft_tokens} if args.num_draft_tokens is not None else {}),
    }


def load_engine(args: argparse.Namespace) -> Any:
    import lmx

    return lmx.load(
        args.model,
        device=args.device,
        dtype=args.dtype,
        adapter=adapter if isinstance(adapter := getattr(args, "adapter", None), str) else None,  # serve's are named
        draft_model=getattr(args, "draft_model", None),
        tensor_parallel=getattr(args, "tensor_parallel", None),
        pipeline_parallel=getattr(args, "pipeline_parallel", None),
        distributed_backend=getattr(args, "distributed_backend", "any"),
        kv_bits=args.kv_bits,
        kv_group_size=args.kv_group_size,
    )


def print_stats(metrics: Any) -> None:
    """One line of request statistics on stderr."""
    m = metrics
    print(
        f"[{m.prompt_tokens} prompt tokens ({m.cached_tokens} cached), {m.generated_tokens} generated | "
        f"prefill {m.prefill_tokens_per_s:.1f} tok/s, decode {m.decode_tokens_per_s:.1f} tok/s, "
        f"first token {m.time_to_first_token * 1000:.0f} ms | peak memory {m.peak_memory / 2**20:.0f} MiB"
        + (f" | {m.accepted_tokens} of {m.draft_tokens} drafted tokens accepted" if m.draft_tokens else "")
        + "]",
        file=sys.stderr,
    )


def stream_to_stdout(stream: Any) -> None:
    for token in stream:
        sys.stdout.write(token.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()


def chat_template_note(info: Any) -> str | None:
    """One line for a model without a chat template of its own (a base model), else None."""
    if info.chat_template == "architecture":
        return (
            f"note: {info.name} has no chat template of its own (a base model?); lmx applies the "
            f"{info.model_type} template, so replies may be continuations, not answers (try lmx generate)"
        )
    if info.chat_template == "none":
        return f"note: {info.name} has no chat template; chat needs one (try lmx generate)"
    return None

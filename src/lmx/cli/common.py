"""Flags shared by the commands that load a model or generate."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_model_args(p: argparse.ArgumentParser, *, named_adapters: bool = False) -> None:
    p.add_argument("--model", "-m", default=None, help="HF model dir or .gguf file (default: bundled Gemma 3 270M)")
    p.add_argument("--device", choices=["cpu", "gpu"], default=None, help="default: LMX_DEVICE, else GPU if present")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16")
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
    }


def load_engine(args: argparse.Namespace) -> Any:
    import lmx

    return lmx.load(
        args.model,
        device=args.device,
        dtype=args.dtype,
        adapter=getattr(args, "adapter", None),
        kv_bits=args.kv_bits,
        kv_group_size=args.kv_group_size,
    )


def print_stats(metrics: Any) -> None:
    """One line of request statistics on stderr."""
    m = metrics
    print(
        f"[{m.prompt_tokens} prompt tokens ({m.cached_tokens} cached), {m.generated_tokens} generated | "
        f"prefill {m.prefill_tokens_per_s:.1f} tok/s, decode {m.decode_tokens_per_s:.1f} tok/s, "
        f"first token {m.time_to_first_token * 1000:.0f} ms | peak memory {m.peak_memory / 2**20:.0f} MiB]",
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

"""One timed generation per process, for each engine: lmx, mlx-lm, llama.cpp, transformers.

Run by ``cpu_gemma270m.py`` (one subprocess per measurement, so each engine gets a clean
process and its own BLAS set-up). Every engine is timed the same way, from the outside:

- the prompt is the same list of token ids (no tokenizer in the timed region);
- decoding is greedy and runs ``--gen-tokens`` tokens, end-of-sequence ignored;
- ``t_k`` is when token k is readable on the host;
- prefill tok/s = prompt tokens / (t_1 - start), TTFT = t_1 - start;
- decode tok/s = (n - 1) / (t_n - t_1).

Prints one JSON line on stdout. Usage::

    python benchmarks/workers.py lmx --model DIR --prompt-tokens 512 --gen-tokens 128
    python benchmarks/workers.py mlx-lm --model DIR [--openblas]
    python benchmarks/workers.py llama.cpp --gguf FILE --threads 2
    python benchmarks/workers.py transformers --model DIR --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from typing import Any


def prompt_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    """The same random prompt for every engine (ids past the first 1000 avoid special tokens)."""
    rng = random.Random(seed)
    return [2] + [rng.randrange(1000, vocab) for _ in range(n - 1)]


def summarize(start: float, stamps: list[float], n_prompt: int, extra: dict[str, Any]) -> dict[str, Any]:
    ttft = stamps[0] - start
    return {
        "prompt_tokens": n_prompt,
        "gen_tokens": len(stamps),
        "time_to_first_token_s": ttft,
        "prefill_tokens_per_s": n_prompt / ttft,
        "decode_tokens_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
        **extra,
    }


def run_lmx(args: argparse.Namespace) -> dict[str, Any]:
    import lmx  # isort: skip  # first: loads OpenBLAS before mlx.core
    import mlx.core as mx

    from lmx.bench import greedy_stamps
    from lmx.generate.step import DecodeState
    from lmx.loading import load_model

    t0 = time.perf_counter()
    if args.kernels == "on":  # the GGUF itself, its quantized matrices on lmx's CPU kernels
        loaded = load_model(args.gguf, dtype=args.dtype, cpu_kernels=True)
    else:  # the float32 HF directory lmx converted from it (MLX's float32 path)
        loaded = load_model(args.model, dtype=args.dtype, cpu_kernels=False)
    load_time = time.perf_counter() - t0
    model = loaded.model
    state = DecodeState(model, loaded.profile)  # as the engine keeps it: traces made once
    ids = prompt_ids(args.prompt_tokens, int(loaded.config["vocab_size"]))

    def once(prompt: list[int], n: int) -> tuple[float, list[float]]:
        return greedy_stamps(model, mx.array([prompt]), n, compile=args.compile, state=state)

    once(ids[:16], 4)  # warm-up
    mx.reset_peak_memory()
    start, stamps = once(ids, args.gen_tokens)
    return summarize(
        start,
        stamps,
        len(ids),
        {
            "load_time_s": load_time,
            "peak_memory_bytes": mx.get_peak_memory(),
            "blas": lmx.runtime.BLAS.name,
            "cpu_kernels": loaded.cpu_kernels,
        },
    )


def run_mlx_lm(args: argparse.Namespace) -> dict[str, Any]:
    if args.openblas:
        import lmx.runtime  # noqa: F401  # loads OpenBLAS globally, as lmx does, before mlx.core
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    t0 = time.perf_counter()
    model, _tokenizer = load(args.model)
    load_time = time.perf_counter() - t0
    ids = prompt_ids(args.prompt_tokens, int(model.args.vocab_size))

    def once(prompt: list[int], n: int) -> tuple[float, list[float]]:
        start = time.perf_counter()
        stamps = []
        for _token, _ in generate_step(mx.array(prompt), model, max_tokens=n):
            stamps.append(time.perf_counter())  # generate_step yields y.item(): on the host already
        return start, stamps

    once(ids[:16], 4)
    mx.reset_peak_memory()
    start, stamps = once(ids, args.gen_tokens)
    weights_dtype = str(model.model.embed_tokens.weight.dtype)
    return summarize(
        start,
        stamps,
        len(ids),
        {"load_time_s": load_time, "peak_memory_bytes": mx.get_peak_memory(), "dtype": weights_dtype},
    )


def run_llama_cpp(args: argparse.Namespace) -> dict[str, Any]:
    # the measurement `lmx bench --against llama.cpp` makes (the tree's lmx: llama.cpp has no baseline)
    from lmx.bench_anchor import measure_llama_cpp

    return measure_llama_cpp(args.gguf, args.prompt_tokens, args.gen_tokens, args.threads)


def run_transformers(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    load_time = time.perf_counter() - t0
    ids = prompt_ids(args.prompt_tokens, int(model.config.vocab_size))

    class Stamps:
        """A streamer: ``put`` is called with the prompt, then with each new token."""

        def __init__(self) -> None:
            self.calls: list[float] = []

        def put(self, value: Any) -> None:
            self.calls.append(time.perf_counter())

        def end(self) -> None:
            pass

    def once(prompt: list[int], n: int) -> tuple[float, list[float]]:
        streamer = Stamps()
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                torch.tensor([prompt]),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                streamer=streamer,
                pad_token_id=0,
            )
        return start, streamer.calls[1:]  # the first put is the prompt

    once(ids[:16], 4)
    start, stamps = once(ids, args.gen_tokens)
    return summarize(start, stamps, len(ids), {"load_time_s": load_time, "threads": args.threads})


RUNNERS = {"lmx": run_lmx, "mlx-lm": run_mlx_lm, "llama.cpp": run_llama_cpp, "transformers": run_transformers}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("engine", choices=list(RUNNERS))
    p.add_argument("--model", help="HF model directory (lmx, mlx-lm, transformers)")
    p.add_argument("--gguf", help="GGUF file (llama.cpp)")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="auto", help="lmx weight dtype")
    p.add_argument("--kernels", default="off", choices=["on", "off"], help="lmx: the GGUF on lmx's CPU kernels")
    p.add_argument("--openblas", action="store_true", help="mlx-lm: load OpenBLAS first, as lmx does")
    p.add_argument(
        "--compile", default="off", choices=["on", "off"], help="lmx: compiled decode step (lmx's default: off)"
    )
    args = p.parse_args(argv)
    args.compile = args.compile == "on"
    result = RUNNERS[args.engine](args)
    result["engine"] = args.engine
    result["pid"] = os.getpid()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

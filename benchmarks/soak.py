"""Soak: a long generation and many sequential requests on the default model, memory watched.

Loads the bundled Gemma 3 270M (``lmx.load()``), then

1. generates ``--long-tokens`` tokens (2,048 by default) in one request, end-of-sequence
   suppressed, sampling MLX's active memory every ``--every`` tokens;
2. runs ``--requests`` short sequential requests (plain prompts and chat turns, each prompt
   different, the prompt cache on), sampling after each;
3. closes the engine and samples once more.

Checks (exit status 1 if one fails):

* during the long generation, active memory above its value after loading stays within the
  KV cache that many tokens need (``lmx.memory.kv_cache_bytes``) plus ``--slack-mib``;
* across the sequential requests it stays within the largest request's KV cache plus slack;
* right after ``close()`` (no ``gc.collect()``) it is back at the value before loading.

Prints a table of the samples and, with ``--markdown``, a section for benchmarks/RESULTS.md.

Usage::

    .venv/bin/python benchmarks/soak.py                         # about 2,500 tokens
    .venv/bin/python benchmarks/soak.py --long-tokens 256 --requests 5   # a quick look
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import lmx  # isort: skip  (loads OpenBLAS before mlx.core)
import mlx.core as mx
from mlx.utils import tree_flatten

from lmx.runtime import memory

MIB = 2**20
PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a map.",
    "Explain how a bicycle stays upright.",
    "List ten uses for a paperclip.",
    "What is the capital of Australia, and why was it chosen?",
    "Describe the water cycle to a child.",
    "Give three tips for learning a new language.",
]


@dataclass
class Sample:
    phase: str
    step: int  # tokens generated so far (long run) or request number
    seconds: float
    active: int
    bound: int  # the most active memory the check allows at this point


def kv_sizer(engine: lmx.Engine) -> Callable[[int], int]:
    """A function giving the KV cache bytes of ``n`` positions in ``engine``'s model."""
    args = engine.model.args
    windows = [args.sliding_window if t == "sliding_attention" else None for t in args.layer_types]
    # the size only: holding the array would keep a weight alive past close()
    floats = (v for _, v in tree_flatten(engine.model.parameters()) if mx.issubdtype(v.dtype, mx.floating))
    itemsize = next(floats).dtype.size
    return lambda n: memory.kv_cache_bytes(windows, args.num_key_value_heads, args.head_dim, n, itemsize)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--long-tokens", type=int, default=2048)
    p.add_argument("--every", type=int, default=128, help="sample every this many tokens of the long run")
    p.add_argument("--requests", type=int, default=30)
    p.add_argument("--request-tokens", type=int, default=16)
    p.add_argument("--slack-mib", type=float, default=16.0, help="allowance for step temporaries (logits etc.)")
    p.add_argument("--markdown", action="store_true", help="also print a RESULTS.md section")
    args = p.parse_args()
    slack = int(args.slack_mib * MIB)

    memory.clear_cache()
    before = memory.active()
    t0 = time.perf_counter()
    engine = lmx.load()
    loaded = memory.active()
    load_s = time.perf_counter() - t0
    kv_bound = kv_sizer(engine)
    print(f"loaded {engine.info().name} in {load_s:.1f} s: active {before / MIB:.1f} -> {loaded / MIB:.1f} MiB")
    samples: list[Sample] = []

    # 1. one long generation; end of sequence suppressed so it runs its full length
    eos = sorted(engine.tokenizer.eos_token_ids)
    prompt = PROMPTS[0]
    n_prompt = len(engine.tokenizer.encode(prompt))
    start = time.perf_counter()
    stream = engine.stream(prompt, max_tokens=args.long_tokens, logit_bias=dict.fromkeys(eos, -100.0))
    n = 0
    for n, _token in enumerate(stream, 1):
        if n % args.every == 0 or n == args.long_tokens:
            bound = loaded + kv_bound(n_prompt + n) + slack
            samples.append(Sample("long", n, time.perf_counter() - start, memory.active(), bound))
    long_s = time.perf_counter() - start
    long_tps = stream.metrics.decode_tokens_per_s
    print(f"long generation: {n} tokens in {long_s:.0f} s ({long_tps:.2f} tok/s decode)")

    # 2. many sequential requests, each prompt different (the prompt cache trims and refills)
    start = time.perf_counter()
    worst = 0
    generated = 0
    for i in range(args.requests):
        text = f"{PROMPTS[i % len(PROMPTS)]} (request {i})"
        if i % 2:
            result = engine.chat([{"role": "user", "content": text}], max_tokens=args.request_tokens)
        else:
            result = engine.generate(text, max_tokens=args.request_tokens)
        generated += len(result.tokens)
        worst = max(worst, result.metrics.prompt_tokens + len(result.tokens))
        bound = loaded + kv_bound(worst) + slack
        samples.append(Sample("requests", i + 1, time.perf_counter() - start, memory.active(), bound))
    requests_s = time.perf_counter() - start
    print(f"{args.requests} requests: {generated} tokens in {requests_s:.0f} s")

    kv_growth = (kv_bound(n_prompt + n) - kv_bound(n_prompt + args.every)) / MIB

    # 3. close: memory back to where it was before loading, without a garbage collection
    engine.close()
    after = memory.active()
    # A few bytes may stay: MLX's global random key, made by the first sampling call.
    samples.append(Sample("closed", 0, 0.0, after, before + 64 * 1024))

    print()
    print(f"{'phase':<9} {'step':>6} {'time s':>8} {'active MiB':>11} {'above load MiB':>15} {'bound MiB':>10}  ok")
    for s in samples:
        above = (s.active - loaded) / MIB if s.phase != "closed" else (s.active - before) / MIB
        print(
            f"{s.phase:<9} {s.step:>6} {s.seconds:>8.1f} {s.active / MIB:>11.1f} {above:>15.2f} "
            f"{s.bound / MIB:>10.1f}  {'yes' if s.active <= s.bound else 'NO'}"
        )
    failed = [s for s in samples if s.active > s.bound]
    long_samples = [s for s in samples if s.phase == "long"]
    request_samples = [s for s in samples if s.phase == "requests"]
    spread = (max(s.active for s in request_samples) - min(s.active for s in request_samples)) / MIB
    print()
    grew = (long_samples[-1].active - long_samples[0].active) / MIB
    print(
        f"long run: active grew {grew:.2f} MiB from token {long_samples[0].step} to {n}; "
        f"the KV cache bound grew {kv_growth:.2f} MiB"
    )
    print(f"requests: active spread {spread:.2f} MiB over {len(request_samples)} requests")
    print(f"after close(): {after} bytes active, before load: {before} bytes")
    print("PASS" if not failed else f"FAIL: {len(failed)} sample(s) above their bound")

    if args.markdown:
        print()
        print(markdown(args, samples, before, loaded, after, load_s, long_s, long_tps, n, requests_s, generated))
    return 0 if not failed else 1


def markdown(
    args: argparse.Namespace,
    samples: list[Sample],
    before: int,
    loaded: int,
    after: int,
    load_s: float,
    long_s: float,
    long_tps: float,
    n_long: int,
    requests_s: float,
    generated: int,
) -> str:
    long_samples = [s for s in samples if s.phase == "long"]
    request_samples = [s for s in samples if s.phase == "requests"]
    lines = [
        "## Soak",
        "",
        f"`benchmarks/soak.py` ({datetime.date.today()}, {platform.machine()}, MLX {mx.__version__}, "
        f"device {mx.default_device()}): the bundled Gemma 3 270M (float32), one generation of {n_long} tokens "
        f"(EOS suppressed), then {len(request_samples)} sequential requests of {args.request_tokens} tokens "
        "(alternating plain and chat prompts, all different, prompt cache on), then `close()`. Active memory is "
        "MLX's `get_active_memory()`; the bound is the memory after loading plus the KV cache the positions "
        f"need (`lmx.memory.kv_cache_bytes`) plus {args.slack_mib:g} MiB for step temporaries.",
        "",
        "| phase | tokens / request | active MiB | above load MiB | bound MiB |",
        "|---|---:|---:|---:|---:|",
        f"| before load | | {before / MIB:.1f} | | |",
        f"| after load ({load_s:.0f} s) | | {loaded / MIB:.1f} | 0 | |",
    ]
    for s in long_samples:
        lines.append(
            f"| long | {s.step} | {s.active / MIB:.1f} | {(s.active - loaded) / MIB:.2f} | {s.bound / MIB:.1f} |"
        )
    for s in request_samples:
        if s.step in (1, 2, len(request_samples)) or s.step % 10 == 0:
            lines.append(
                f"| requests | {s.step} | {s.active / MIB:.1f} | {(s.active - loaded) / MIB:.2f} | "
                f"{s.bound / MIB:.1f} |"
            )
    lines.append(f"| after `close()` | | {after / MIB:.2f} ({after} bytes) | | {(before + 64 * 1024) / MIB:.2f} |")
    spread = (max(s.active for s in request_samples) - min(s.active for s in request_samples)) / MIB
    lines += [
        "",
        f"- Long run: {n_long} tokens in {long_s:.0f} s ({long_tps:.2f} tok/s decode on a shared 2-core CPU); "
        f"active memory rose {(long_samples[-1].active - long_samples[0].active) / MIB:.2f} MiB between token "
        f"{long_samples[0].step} and {long_samples[-1].step}, the KV cache's growth.",
        f"- Sequential requests: {generated} tokens in {requests_s:.0f} s; active memory spread "
        f"{spread:.2f} MiB across the {len(request_samples)} requests (no growth from request to request).",
        f"- After `close()`: {after} bytes active against {before} before loading (no garbage collection "
        "needed; the bound allows 64 KiB for MLX's global random key and the like).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

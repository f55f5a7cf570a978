"""Prompts/s of the 4-domain classifier (technical, creative, ethical, casual) at several batch sizes.

    python benchmarks/classify_bench.py                       # bundled Gemma 3 270M
    python benchmarks/classify_bench.py --model path.gguf --batch-sizes 1,8,32 --json out.json
    python benchmarks/classify_bench.py --tiny gemma3         # a tiny random model (needs torch)

Each batch size gets one untimed warm-up call, then ``--repeats`` timed calls over
``--n-texts`` texts (the 32 sample texts below, cycled); the best call is reported. The
accuracy column is informative only (32 hand-labelled sentences). ``prompts/cpu-s`` divides
by the process's CPU time: on a machine shared with other work it tells more than wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import lmx  # isort: skip  # loads OpenBLAS before mlx.core

from lmx.classify import classify

LABELS = ["technical", "creative", "ethical", "casual"]

SAMPLES = {
    "technical": [
        "The kernel scheduler keeps runnable tasks in a red-black tree keyed by virtual runtime.",
        "To fix the race, take the mutex before reading the shared counter and release it after the write.",
        "Set the MTU to 9000 on both interfaces, then rerun iperf to measure the throughput again.",
        "The B-tree splits a full node into two halves and pushes the median key up to the parent.",
        "Our API returns HTTP 429 when a client exceeds 100 requests per minute; retry with backoff.",
        "Compile with -O2 and link against OpenBLAS; the matrix multiply then runs ten times faster.",
        "The transformer's attention cost grows quadratically with the sequence length.",
        "Replace the polling loop with an epoll-based event loop to cut CPU usage when idle.",
    ],
    "creative": [
        "The moon hummed a lullaby to the sleeping sea, and the waves dreamed in silver.",
        "Once upon a time, a lighthouse keeper found a door in the fog that opened onto yesterday.",
        "Her laughter was a handful of bright marbles spilled across a wooden floor.",
        "The dragon folded its wings like an old umbrella and asked the knight for a cup of tea.",
        "In the city of glass, every secret cast a shadow that walked a few steps behind its owner.",
        "Autumn wrote its name in red ink on every leaf, then signed the sky with geese.",
        "The clockmaker's daughter could hear the minutes whispering to one another at night.",
        "A poem about rain: soft drums on the roof, the garden drinking, the world made new.",
    ],
    "ethical": [
        "Is it fair to let an algorithm decide who receives a loan when its data reflects past bias?",
        "Doctors must weigh a patient's autonomy against their duty to prevent harm.",
        "Should companies be allowed to sell the location data of users who never truly consented?",
        "Lying to protect a friend's feelings may be kind, but does it respect their right to the truth?",
        "We owe future generations a livable planet, even when that costs us comfort today.",
        "Whistleblowers break promises of secrecy to expose wrongdoing; when is that justified?",
        "Is it morally acceptable to test new drugs on animals if it saves human lives?",
        "Wealthy nations have a moral obligation to accept refugees fleeing war.",
    ],
    "casual": [
        "lol yeah i'm just chilling at home, wanna grab pizza later?",
        "omg the game last night was wild, did you see that last-second goal??",
        "hey, running 10 min late, save me a seat!",
        "Honestly I could eat tacos every single day and never get bored.",
        "ugh mondays... need coffee asap",
        "Just got back from the beach, sunburned but totally worth it haha",
        "Anyone watching the new season? no spoilers pls",
        "My cat knocked my phone off the table again, classic Tuesday.",
    ],
}


def sample_texts(n: int) -> tuple[list[str], list[str]]:
    """``n`` texts and their expected labels, cycling through the samples."""
    pairs = [(text, label) for label, texts in SAMPLES.items() for text in texts]
    chosen = [pairs[i % len(pairs)] for i in range(n)]
    return [t for t, _ in chosen], [label for _, label in chosen]


def run(engine: lmx.Engine, batch_sizes: list[int], n_texts: int, repeats: int) -> list[dict]:
    texts, expected = sample_texts(n_texts)
    rows = []
    for bs in batch_sizes:
        classify(engine, texts[:bs], LABELS, batch_size=bs)  # warm-up
        best = cpu = float("inf")
        results = []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            results = classify(engine, texts, LABELS, batch_size=bs)
            best = min(best, time.perf_counter() - t0)
            cpu = min(cpu, time.process_time() - c0)
        accuracy = sum(r.label == e for r, e in zip(results, expected)) / len(texts)
        rows.append(
            {
                "batch_size": bs,
                "texts": len(texts),
                "seconds": best,
                "prompts_per_s": len(texts) / best,
                "ms_per_prompt": 1000 * best / len(texts),
                "cpu_s": cpu,
                "prompts_per_cpu_s": len(texts) / cpu,
                "prompt_tokens": engine.metrics.prompt_tokens,
                "peak_memory_mib": engine.metrics.peak_memory / 2**20,
                "accuracy": accuracy,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", "-m", default=None, help="HF dir or .gguf (default: bundled Gemma 3 270M)")
    p.add_argument("--tiny", choices=["gemma3", "qwen3"], default=None, help="use a tiny random model instead")
    p.add_argument("--device", choices=["cpu", "gpu"], default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--n-texts", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if args.tiny:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from tiny_models import save_tiny

            save_tiny(args.tiny, Path(tmp))
            model = tmp
        t0 = time.perf_counter()
        engine = lmx.load(model, device=args.device, dtype=args.dtype)
        load_s = time.perf_counter() - t0
        with engine:
            info = engine.info()
            rows = run(engine, batch_sizes, args.n_texts, args.repeats)

    name = f"tiny random {args.tiny}" if args.tiny else info.name
    print(f"model {name} ({info.model_type}, {info.dtype}) on {info.device}; loaded in {load_s:.1f} s")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{os.cpu_count()} CPUs, load average {load:.1f} (a busy machine slows the wall-clock numbers)")
    print(
        f"{'batch':>5} {'prompts/s':>10} {'ms/prompt':>10} {'prompts/cpu-s':>13} {'tokens':>7} "
        f"{'peak MiB':>9} {'accuracy':>8}"
    )
    for r in rows:
        print(
            f"{r['batch_size']:>5} {r['prompts_per_s']:>10.2f} {r['ms_per_prompt']:>10.1f} "
            f"{r['prompts_per_cpu_s']:>13.2f} "
            f"{r['prompt_tokens']:>7} {r['peak_memory_mib']:>9.0f} {r['accuracy']:>8.2f}"
        )
    if args.json:
        record = {
            "model": info.as_dict(),
            "machine": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "load_average": load,
            "labels": LABELS,
            "results": rows,
        }
        Path(args.json).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

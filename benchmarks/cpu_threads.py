"""CPU thread policy, A/B interleaved: ``lmx bench`` under each policy, round after round, optionally
while busy processes compete for the cores (issue 16 part 5).

Policies are environment settings of a fresh ``lmx bench`` process (so OpenBLAS starts as lmx would
start it):

- ``blas2``: ``LMX_BLAS_THREADS=2``: OpenBLAS splits each prefill product over 2 threads that spin
  while they wait (lmx's default before this change, when OpenBLAS ran one thread per CPU);
- ``pool``: ``LMX_BLAS_THREADS=1`` (the default now): lmx's own pool, whose threads sleep while they
  wait, shares the prefill blocks out and each runs a one-thread sgemm.

Usage::

    python benchmarks/cpu_threads.py --busy 2 --rounds 4 > benchmarks/cpu_threads_busy.json

Prints one JSON object: per policy and prompt length, every run's time to first token, prefill and
decode tok/s, and their medians. ``--busy N`` runs N processes that spin on the CPU for the whole
measurement (an artificial competing load); ``uptime``'s load average is recorded before and after.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time

POLICIES = {"blas2": {"LMX_BLAS_THREADS": "2"}, "pool": {"LMX_BLAS_THREADS": "1"}}


def _spin() -> None:
    while True:
        pass


def _bench(env: dict[str, str], prompt: int, gen: int) -> dict:
    cmd = [sys.executable, "-m", "lmx.cli.main", "bench", "--prompt-tokens", str(prompt), "--gen-tokens", str(gen)]
    cmd += ["--repeat", "1", "--json"]
    out = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, check=True).stdout
    run = json.loads(out)
    return {
        "ttft_s": run["time_to_first_token_s"],
        "prefill_tok_s": run["prefill_tokens_per_s"],
        "decode_tok_s": run["decode_tokens_per_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", type=int, default=0, help="competing busy processes (default 0)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds; each runs every policy once per prompt")
    parser.add_argument("--prompts", default="16,512", help="prompt lengths, comma-separated")
    parser.add_argument("--gen", type=int, default=32, help="generated tokens per run")
    args = parser.parse_args()
    prompts = [int(p) for p in args.prompts.split(",")]
    busy = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.busy)]
    for p in busy:
        p.start()
    load_before = os.getloadavg()
    runs: dict[str, dict[int, list[dict]]] = {name: {n: [] for n in prompts} for name in POLICIES}
    started = time.time()
    try:
        for r in range(args.rounds):
            # Alternate which policy goes first, so neither always runs right after the other.
            order = list(POLICIES) if r % 2 == 0 else list(reversed(POLICIES))
            for n in prompts:
                for name in order:
                    runs[name][n].append(_bench(POLICIES[name], n, args.gen))
    finally:
        for p in busy:
            p.terminate()
    result = {
        "busy_processes": args.busy,
        "rounds": args.rounds,
        "gen_tokens": args.gen,
        "cpus": os.cpu_count(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "seconds": round(time.time() - started, 1),
        "policies": {name: POLICIES[name] for name in POLICIES},
        "results": {
            name: {
                str(n): {
                    "runs": rs,
                    "median": {key: statistics.median(run[key] for run in rs) for key in rs[0]},
                }
                for n, rs in by_prompt.items()
            }
            for name, by_prompt in runs.items()
        },
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

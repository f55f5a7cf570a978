"""A shared system prompt is prefilled once: 8 requests with one long system prompt.

    python benchmarks/prefix_share.py [--model PATH] [--system-tokens 1000] [--requests 8]
        [--max-tokens 16] [--concurrent] [--json out.json]

Builds a system prompt of about ``--system-tokens`` tokens, then sends ``--requests`` chats that
share it and ask different questions: one after the other (default) or all at once
(``--concurrent``). For each request it prints the prompt tokens, the tokens taken from the
prefix cache and the time to first token; then the same requests on an engine without the
prefix cache (``prompt_cache=False``), in the same process, for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time

import lmx

QUESTIONS = [
    "What is the first rule?",
    "Summarise the rules in one line.",
    "Which rule is about numbers?",
    "Is there a rule about dates?",
    "Name two rules that conflict.",
    "What should I do first?",
    "Give an example of rule 12.",
    "Which rule matters most?",
]


def system_prompt(engine: lmx.Engine, n_tokens: int) -> str:
    rules, i = [], 1
    while len(engine.tokenizer.encode(" ".join(rules))) < n_tokens:
        rules.append(f"Rule {i}: always check item {i * 7 % 97} against the list before answering.")
        i += 1
    return "You are a careful assistant. " + " ".join(rules)


def run(engine: lmx.Engine, system: str, n: int, max_tokens: int, concurrent: bool) -> list[dict]:
    def one(i: int, out: list) -> None:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
        ids = engine.tokenizer.encode_chat(messages, add_generation_prompt=True)
        t0 = time.perf_counter()
        stream = engine.stream(ids, max_tokens=max_tokens)
        ttft = None
        for _ in stream:
            if ttft is None:
                ttft = time.perf_counter() - t0
        m = stream.metrics
        out[i] = {"prompt_tokens": m.prompt_tokens, "cached_tokens": m.cached_tokens, "ttft_s": ttft}

    out: list = [None] * n
    if concurrent:
        threads = [threading.Thread(target=one, args=(i, out)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i in range(n):
            one(i, out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--system-tokens", type=int, default=1000)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--concurrent", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    result: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "command": " ".join(["python", *sys.argv]),
    }
    for label, cache in (("prefix_cache", True), ("no_prefix_cache", False)):
        with lmx.load(args.model, prompt_cache=cache) as engine:
            system = system_prompt(engine, args.system_tokens)
            engine.generate("warm up", max_tokens=2)
            rows = run(engine, system, args.requests, args.max_tokens, args.concurrent)
            later = [r["ttft_s"] for r in rows[1:]]
            result[label] = {
                "requests": rows,
                "ttft_first_s": rows[0]["ttft_s"],
                "ttft_later_median_s": statistics.median(later) if later else None,
                "prefilled_tokens": sum(r["prompt_tokens"] - r["cached_tokens"] for r in rows),
            }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

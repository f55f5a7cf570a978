"""The engine with ``LMX_ENCODE_THREAD`` off and on, on one device: the same outputs?

    python benchmarks/gpu_thread_check.py --model /tmp/r270.gguf --device gpu [--json out.json]

tests/test_encoder.py checks this on the CPU, where the thread is forced on. This script is the
same check where the thread is the default (a CUDA GPU), through the public API: the model is
loaded once with the thread off and once with it on, and each engine runs

- three requests alone, greedy, with log-probs and 3 top alternatives (end of text banned, so
  every one runs its full length): tokens and log-probs must be equal bit for bit;
- one seeded sampled request alone (temperature 0.8, top_p 0.9, seed 7): tokens equal;
- eight greedy requests at once from eight threads: tokens equal. Where a row joins the batch
  depends on timing, so only the tokens are compared here (tests/test_scheduler.py's rule).

Prints one JSON object; exits 1 when anything differs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from typing import Any

import lmx


def prompts(n: int, length: int) -> list[list[int]]:
    return [[(13 * i + 7 * j) % 997 + 10 for j in range(length)] for i in range(n)]


def outputs(model: str | None, device: str | None, thread: str, gen_tokens: int) -> dict[str, Any]:
    os.environ["LMX_ENCODE_THREAD"] = thread  # read when the model is loaded
    with lmx.load(model, device=device, prompt_cache=False) as engine:
        bias = {t: -100.0 for t in engine.tokenizer.eos_token_ids}
        greedy = dict(max_tokens=gen_tokens, temperature=0.0, logit_bias=bias)
        alone = [engine.generate(p, logprobs=3, **greedy) for p in prompts(3, 40)]
        seeded = engine.generate(prompts(1, 24)[0], max_tokens=gen_tokens, temperature=0.8, top_p=0.9, seed=7)
        together: list[list[int] | None] = [None] * 8

        def one(i: int, p: list[int]) -> None:
            together[i] = engine.generate(p, **greedy).tokens

        threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(prompts(8, 25))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return {
            "profile": engine.info().profile,
            "alone": [(c.tokens, c.logprobs, c.top_logprobs) for c in alone],
            "seeded": seeded.tokens,
            "together": together,
        }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--device", default=None, choices=["cpu", "gpu"])
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    off = outputs(args.model, args.device, "off", args.gen_tokens)
    on = outputs(args.model, args.device, "on", args.gen_tokens)
    report = {
        "device": on["profile"]["device"],
        "thread_off_on": [off["profile"]["encode_thread"], on["profile"]["encode_thread"]],
        "alone_equal": [a == b for a, b in zip(off["alone"], on["alone"])],
        "seeded_equal": off["seeded"] == on["seeded"],
        "together_equal": [a == b for a, b in zip(off["together"], on["together"])],
        "tokens_each": args.gen_tokens,
    }
    ok = (
        report["thread_off_on"] == [False, True]
        and all(report["alone_equal"])
        and report["seeded_equal"]
        and all(report["together_equal"])
    )
    report["ok"] = ok
    print(json.dumps(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report | {"off": off, "on": on}, f)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

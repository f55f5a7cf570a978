"""One stream through the public API: time to first token and decode tokens/s of ``engine.stream``.

    python benchmarks/single_stream.py [--model PATH] [--device cpu|gpu] [--prompt-tokens 128]
        [--gen-tokens 128] [--rounds 5]

What a user of ``lmx.load(...).stream(...)`` gets, whatever sits under the engine (the step loop
before the scheduler existed, the scheduler after), so two versions of lmx can be compared by
running this file under each (``PYTHONPATH=<their src>``) in turns. Greedy, EOS banned so every
round makes ``--gen-tokens`` tokens; one untimed warm-up round; medians over ``--rounds``.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import lmx


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--device", default=None, choices=["cpu", "gpu"])
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--label", default="")
    args = p.parse_args()
    with lmx.load(args.model, device=args.device, prompt_cache=False) as engine:
        eos = set(engine.tokenizer.eos_token_ids)
        prompt = [(7 * i) % 1000 + 10 for i in range(args.prompt_tokens)]
        bias = {t: -100.0 for t in eos}
        ttfts, rates = [], []
        for r in range(args.rounds + 1):
            t0 = time.perf_counter()
            stamps = []
            for _ in engine.stream(prompt, max_tokens=args.gen_tokens, logit_bias=bias):
                stamps.append(time.perf_counter())
            if r == 0:
                continue  # warm-up
            ttfts.append(stamps[0] - t0)
            rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        print(
            json.dumps(
                {
                    "label": args.label,
                    "lmx": lmx.__file__,
                    "model": engine.info().name,
                    "device": engine.info().device,
                    "prompt_tokens": args.prompt_tokens,
                    "gen_tokens": args.gen_tokens,
                    "ttft_ms_median": 1000 * statistics.median(ttfts),
                    "decode_tok_s_median": statistics.median(rates),
                    "decode_tok_s_all": [round(x, 1) for x in rates],
                }
            )
        )


if __name__ == "__main__":
    main()

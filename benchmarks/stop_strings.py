"""Stop strings at scale (issue 21): the linear matcher (every stop string searched on every
token) against the sorted-strings matcher of ``lmx.generate.stopping``.

Part 1, the matcher alone: build it and feed the 16 pieces of text of a 16-token completion,
with 4, 4096 (``MAX_STOPS``, the per-request cap) and 480,000 stop strings (issue 21's case; the
options refuse that many now, the matcher itself must still scale).
Part 2, end to end: a 16-token greedy completion of the bundled Gemma 3 270M with 4096 random
stop strings, the engine using each matcher in turn (interleaved rounds, medians).

Usage: python benchmarks/stop_strings.py [--rounds 3] [--no-engine]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from lmx.generate.stopping import StopStringMatcher


class LinearMatcher:
    """lmx's matcher before issue 21 (verbatim logic): O(stop strings) per token."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return buf[: min(hits)]
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:n]):
                    best = n
                    break
        self._held = buf[len(buf) - best :]
        return buf[: len(buf) - best]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held


def random_stops(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice("qwxzjv") for _ in range(rng.randint(4, 12))) for _ in range(n)]


PIECES = [
    " The",
    " quick",
    " brown",
    " fox",
    " jumps",
    " over",
    " the",
    " lazy",
    " dog",
    ".",
    " It",
    " was",
    " a",
    " sunny",
    " day",
    ".",
]


def time_matcher(cls: type, stops: list[str]) -> float:
    start = time.perf_counter()
    m = cls(stops)
    for piece in PIECES:
        m.feed(piece)
    m.flush()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-engine", action="store_true")
    args = ap.parse_args()
    results: dict[str, dict[str, float]] = {}
    for n in (4, 4096, 480_000):
        stops = random_stops(n)
        times: dict[str, list[float]] = {"linear": [], "sorted": []}
        for r in range(args.rounds):
            order = [("linear", LinearMatcher), ("sorted", StopStringMatcher)]
            for name, cls in order if r % 2 == 0 else order[::-1]:
                times[name].append(time_matcher(cls, stops))
        results[f"matcher, {n} stops"] = {k: statistics.median(v) for k, v in times.items()}
        print(
            f"matcher, {n:>7} stops, 16 pieces: "
            + ", ".join(f"{k} {v:.4f} s" for k, v in results[f"matcher, {n} stops"].items()),
            flush=True,
        )
    if not args.no_engine:
        import lmx
        import lmx.generate.row

        engine = lmx.load()
        prompt = "Write one sentence about a fox."
        stops = random_stops(4096, seed=1)
        engine.generate(prompt, max_tokens=4)  # warm up
        times = {"linear": [], "sorted": []}
        for r in range(args.rounds):
            order = [("linear", LinearMatcher), ("sorted", StopStringMatcher)]
            for name, cls in order if r % 2 == 0 else order[::-1]:
                lmx.generate.row.StopStringMatcher = cls  # each row's output builds its matcher by this name
                start = time.perf_counter()
                out = engine.generate(prompt, max_tokens=16, stop=stops)
                times[name].append(time.perf_counter() - start)
                assert len(out.tokens) == 16, out
        lmx.generate.row.StopStringMatcher = StopStringMatcher
        times["no stops"] = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            engine.generate(prompt, max_tokens=16)
            times["no stops"].append(time.perf_counter() - start)
        results["engine, 16 tokens, 4096 stops"] = {k: statistics.median(v) for k, v in times.items()}
        print(
            "engine, 16-token completion, 4096 stops: "
            + ", ".join(f"{k} {v:.3f} s" for k, v in results["engine, 16 tokens, 4096 stops"].items())
        )
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

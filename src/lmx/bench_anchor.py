"""``lmx bench --against llama.cpp``: lmx and llama.cpp on the same GGUF file on the CPU, interleaved.

Each measurement runs in a process of its own (``python -m lmx.bench_anchor ENGINE ...`` prints
one JSON line), so neither engine's threads or memory weigh on the other's, and the order of the
engines rotates from round to round. Both are fed the same random token ids, decode greedily
without stopping at end-of-sequence, and are timed from outside by the same definitions
(benchmarks/RESULTS.md): ``t_k`` is when token k is readable on the host; prefill tok/s = prompt
tokens / (t_1 - start); decode tok/s = (n - 1) / (t_n - t_1). lmx runs the file as it loads it by
default (its quantized matrices on lmx's CPU kernels where they are built); llama.cpp
(``llama-cpp-python``, the ``bench`` extra) with its defaults and as many threads as lmx's kernels.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmx.errors import InvalidOptionError, LmxError, ModelNotFoundError

ENGINES = ("lmx", "llama.cpp")


def prompt_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    """The same random prompt for both engines (ids past the first 1000 avoid special tokens; past
    the first half of a tiny test vocabulary)."""
    rng = random.Random(seed)
    low = min(1000, vocab // 2)
    return [2] + [rng.randrange(low, vocab) for _ in range(n - 1)]


def timings(start: float, stamps: list[float], n_prompt: int) -> dict[str, float]:
    """A generation's figures by the definitions of benchmarks/RESULTS.md, from its start and the
    times its tokens were readable."""
    ttft = stamps[0] - start
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    return {
        "prompt_tokens": n_prompt,
        "gen_tokens": len(stamps),
        "time_to_first_token_s": ttft,
        "prefill_tokens_per_s": n_prompt / ttft,
        "decode_tokens_per_s": decode,
    }


def measure_lmx(gguf: str, prompt_tokens: int, gen_tokens: int) -> dict[str, Any]:
    """One warm-up, then one timed greedy generation of ``gen_tokens`` after ``prompt_tokens``."""
    import lmx  # noqa: F401  # isort: skip  (first: loads OpenBLAS before mlx.core)
    import mlx.core as mx

    from lmx.bench import greedy_stamps
    from lmx.generate.step import DecodeState
    from lmx.loading import load_model
    from lmx.runtime.device import choose_device

    choose_device("cpu")
    t0 = time.perf_counter()
    loaded = load_model(gguf)
    load_time = time.perf_counter() - t0
    state = DecodeState(loaded.model, loaded.profile)  # as the engine keeps it
    ids = prompt_ids(prompt_tokens, int(loaded.config["vocab_size"]))

    def once(prompt: list[int], n: int) -> tuple[float, list[float]]:
        return greedy_stamps(loaded.model, mx.array([prompt]), n, state=state)

    once(ids[:16], 4)
    mx.reset_peak_memory()
    out = timings(*once(ids, gen_tokens), len(ids))
    return {
        **out,
        "load_time_s": load_time,
        "peak_memory_bytes": mx.get_peak_memory(),
        "cpu_kernels": loaded.cpu_kernels,
    }


def measure_llama_cpp(gguf: str, prompt_tokens: int, gen_tokens: int, threads: int) -> dict[str, Any]:
    """The same for llama.cpp (CPU, ``threads`` for prompt and decode, prompt batches of 512)."""
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(
        model_path=gguf,
        n_ctx=prompt_tokens + gen_tokens + 64,
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        n_gpu_layers=0,
        verbose=False,
    )
    load_time = time.perf_counter() - t0
    ids = prompt_ids(prompt_tokens, llm.n_vocab())

    def once(prompt: list[int], n: int) -> tuple[float, list[float]]:
        llm.reset()
        start = time.perf_counter()
        stamps: list[float] = []
        for _token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == n:
                break
        return start, stamps

    once(ids[:16], 4)
    return {**timings(*once(ids, gen_tokens), len(ids)), "load_time_s": load_time, "threads": threads}


class Interleaved:
    """Medians, ratios and rounds won over ``runs`` (dicts with ``engine`` and ``round``) of lmx
    against one ``anchor`` engine."""

    anchor: str
    runs: list[dict[str, Any]]

    def median(self, engine: str, key: str) -> float:
        return statistics.median(r[key] for r in self.runs if r["engine"] == engine)

    def ratio(self, key: str) -> float:
        return self.median("lmx", key) / self.median(self.anchor, key)

    def rounds_won(self, key: str) -> int:
        """Rounds in which lmx's figure beat the anchor's."""
        by_round: dict[int, dict[str, float]] = {}
        for r in self.runs:
            by_round.setdefault(r["round"], {})[r["engine"]] = r[key]
        return sum(1 for v in by_round.values() if len(v) == 2 and v["lmx"] > v[self.anchor])


@dataclass
class AnchorResult(Interleaved):
    """Every round's measurements, and the medians and lmx / llama.cpp ratios over the rounds."""

    model: str
    prompt_tokens: int
    gen_tokens: int
    threads: int
    runs: list[dict[str, Any]] = field(default_factory=list)
    anchor = "llama.cpp"

    def as_dict(self) -> dict[str, Any]:
        keys = ("decode_tokens_per_s", "prefill_tokens_per_s", "time_to_first_token_s")
        return {
            "model": self.model,
            "device": "cpu",
            "prompt_tokens": self.prompt_tokens,
            "gen_tokens": self.gen_tokens,
            "threads": self.threads,
            "rounds": len({r["round"] for r in self.runs}),
            "medians": {e: {k: self.median(e, k) for k in keys} for e in ENGINES},
            "lmx_over_llama_cpp": {k: self.ratio(k) for k in keys[:2]},
            "rounds_lmx_faster": {k: self.rounds_won(k) for k in keys[:2]},
            "runs": self.runs,
        }


def run_anchor(
    model: str | None,
    *,
    prompt_tokens: int = 512,
    gen_tokens: int = 128,
    rounds: int = 5,
    threads: int | None = None,
    timeout: float = 1800,
    on_run: Callable[[dict[str, Any]], None] | None = None,
) -> AnchorResult:
    """lmx against llama.cpp on one GGUF file (None: the bundled one), ``rounds`` interleaved rounds.

    Raises:
        InvalidOptionError: the model is not a .gguf file, a count is below 1, or llama-cpp-python
            is not installed.
        ModelNotFoundError: the file does not exist.
        LmxError: a measurement process failed (its last error line is in the message).
    """
    from lmx.kernels import physical_cores
    from lmx.loading.default_model import default_gguf_path

    for name, value in (("prompt_tokens", prompt_tokens), ("rounds", rounds)):
        if value < 1:
            raise InvalidOptionError(f"{name} must be >= 1, got {value}")
    if gen_tokens < 2:
        raise InvalidOptionError(f"gen_tokens must be >= 2 to time decoding, got {gen_tokens}")
    path = Path(model) if model is not None else default_gguf_path()
    if path.suffix != ".gguf":
        raise InvalidOptionError(f"--against llama.cpp needs a .gguf file that both engines read, got {str(path)!r}")
    if not path.is_file():
        raise ModelNotFoundError(f"no such GGUF file: {str(path)!r}")
    if importlib.util.find_spec("llama_cpp") is None:
        raise InvalidOptionError("--against llama.cpp needs llama-cpp-python: pip install 'lmx[bench]'")
    threads = physical_cores() if threads is None else threads
    if threads < 1:
        raise InvalidOptionError(f"threads must be >= 1, got {threads}")
    result = AnchorResult(str(path), prompt_tokens, gen_tokens, threads)
    for r in range(rounds):
        for engine in ENGINES[r % 2 :] + ENGINES[: r % 2]:  # the order rotates
            cmd = [sys.executable, "-m", "lmx.bench_anchor", engine, "--gguf", str(path)]
            cmd += ["--prompt-tokens", str(prompt_tokens), "--gen-tokens", str(gen_tokens), "--threads", str(threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            if out.returncode != 0:
                last = (out.stderr.strip().splitlines() or ["no output"])[-1]
                raise LmxError(f"the {engine} measurement of round {r + 1} failed: {last}")
            run = {"engine": engine, "round": r + 1, **json.loads(out.stdout.strip().splitlines()[-1])}
            result.runs.append(run)
            if on_run is not None:
                on_run(run)
    return result


def main(argv: list[str] | None = None) -> int:
    """One measurement in this process (what :func:`run_anchor` starts): one JSON line."""
    p = argparse.ArgumentParser(description="one lmx bench --against llama.cpp measurement")
    p.add_argument("engine", choices=ENGINES)
    p.add_argument("--gguf", required=True)
    p.add_argument("--prompt-tokens", type=int, required=True)
    p.add_argument("--gen-tokens", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    args = p.parse_args(argv)
    if args.engine == "lmx":
        out = measure_lmx(args.gguf, args.prompt_tokens, args.gen_tokens)
    else:
        out = measure_llama_cpp(args.gguf, args.prompt_tokens, args.gen_tokens, args.threads)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""In-process A/B on this CPU: lmx's decode variants against mlx-lm, alternating every run.

On a machine shared with other jobs, load swings by 10x within minutes, so measurements
taken in separate processes minutes apart are not comparable (``cpu_gemma270m.py`` keeps
those for the anchors that need their own process). Here both engines live in one process,
load the same checkpoint, and take turns run by run; the per-round ratios and their median
are what to read. OpenBLAS is loaded (lmx does it on import), so mlx-lm here is
"mlx-lm + OpenBLAS"; its default set-up (reference BLAS) needs its own process.

Usage::

    .venv/bin/python benchmarks/cpu_ab.py --rounds 7 --prompt-tokens 128 --gen-tokens 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import lmx.runtime  # noqa: E402, F401  # isort: skip  (first: loads OpenBLAS before mlx.core)
import mlx.core as mx  # noqa: E402
from workers import prompt_ids, summarize  # noqa: E402

from lmx.bench import greedy_stamps  # noqa: E402
from lmx.generate.step import DecodeState  # noqa: E402
from lmx.loading import load_model  # noqa: E402
from lmx.loading.default_model import default_model_path  # noqa: E402


def lmx_runner(model: Any, compile: bool) -> Any:
    state = DecodeState(model)  # as the engine keeps it: traces made once

    def run(prompt: list[int], n: int) -> tuple[float, list[float]]:
        return greedy_stamps(model, mx.array([prompt]), n, compile=compile, state=state)

    return run


def mlx_lm_runner(model: Any) -> Any:
    from mlx_lm.generate import generate_step as mlx_lm_step

    def run(prompt: list[int], n: int) -> tuple[float, list[float]]:
        start = time.perf_counter()
        stamps = []
        for _token, _ in mlx_lm_step(mx.array(prompt), model, max_tokens=n):
            stamps.append(time.perf_counter())
        return start, stamps

    return run


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF model dir (default: the bundled Gemma 3 270M)")
    p.add_argument("--variants", default="lmx-eager,lmx-compiled,mlx-lm", help="also: lmx-kernels")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    path = args.model or str(default_model_path())
    variants = [v.strip() for v in args.variants.split(",")]
    runners: dict[str, Any] = {}
    if any(v.startswith("lmx") for v in variants):
        model = load_model(path, dtype=args.dtype, cpu_kernels=False).model
        runners["lmx-eager"] = lmx_runner(model, False)
        runners["lmx-compiled"] = lmx_runner(model, True)
    if "lmx-kernels" in variants:  # the GGUF itself on lmx's CPU kernels (lmx.kernels)
        from lmx.loading.default_model import default_gguf_path

        kmodel = load_model(default_gguf_path(), dtype=args.dtype, cpu_kernels=True).model
        runners["lmx-kernels"] = lmx_runner(kmodel, False)
    if "mlx-lm" in variants:
        from mlx_lm import load

        runners["mlx-lm"] = mlx_lm_runner(load(path)[0])
    vocab = 262144  # Gemma 3's; every variant runs the same model
    prompt = prompt_ids(args.prompt_tokens, vocab)
    for v in variants:  # warm-up (compiled kernels, allocations)
        runners[v](prompt[:16], 4)
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants[r % len(variants) :] + variants[: r % len(variants)]:
            start, stamps = runners[v](prompt, args.gen_tokens)
            runs[v].append(summarize(start, stamps, len(prompt), {}))
        line = "  ".join(
            f"{v} {runs[v][-1]['decode_tokens_per_s']:.2f}/{runs[v][-1]['prefill_tokens_per_s']:.0f}" for v in variants
        )
        print(f"round {r + 1} (decode/prefill tok/s): {line}", file=sys.stderr, flush=True)
    base = variants[0]
    print(f"\n{args.prompt_tokens}-token prompt, {args.gen_tokens} generated, {args.rounds} rounds (medians)")
    print(f"{'variant':14} {'decode':>8} {'prefill':>8}  median of per-round ratio to {base}: decode prefill")
    for v in variants:
        dec = statistics.median(x["decode_tokens_per_s"] for x in runs[v])
        pre = statistics.median(x["prefill_tokens_per_s"] for x in runs[v])
        rd = statistics.median(a["decode_tokens_per_s"] / b["decode_tokens_per_s"] for a, b in zip(runs[v], runs[base]))
        rp = statistics.median(
            a["prefill_tokens_per_s"] / b["prefill_tokens_per_s"] for a, b in zip(runs[v], runs[base])
        )
        print(f"{v:14} {dec:8.2f} {pre:8.1f}  {rd:33.2f}x {rp:7.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Gemma 3 270M on this CPU: lmx against mlx-lm, llama.cpp and transformers, interleaved.

Every engine runs the bundled checkpoint: lmx, mlx-lm and transformers the HF directory
that lmx converted from the GGUF (float32 safetensors), llama.cpp the GGUF itself (Q4_K_M).
Each measurement is a fresh subprocess (see ``workers.py``); the engines take turns within
each round, the order rotating from round to round, so load on the shared machine falls on
all of them alike. The table shows medians and each engine's ratio to lmx.

Usage::

    .venv/bin/python benchmarks/cpu_gemma270m.py --rounds 5 --json benchmarks/cpu_gemma270m.json
    .venv/bin/python benchmarks/cpu_gemma270m.py --engines lmx,mlx-lm-default --rounds 3

``lmx-kernels-baseline`` is ``lmx-kernels`` run from a second source tree (``--baseline-src DIR``,
e.g. ``git worktree add --detach DIR main`` with its kernels built there), so old and new kernels
take turns in one run, under the same load.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> worker arguments (besides the model and the shape).
ENGINES = {
    "lmx": ["lmx"],  # the float32 HF directory (MLX + OpenBLAS)
    "lmx-kernels": ["lmx", "--kernels", "on"],  # the GGUF on lmx's CPU kernels (lmx.kernels)
    "lmx-kernels-baseline": ["lmx", "--kernels", "on"],  # from --baseline-src (see measure)
    "lmx-kernels-1thread": ["lmx", "--kernels", "on"],  # LMX_CPU_THREADS=1 (see ENV)
    "lmx-kernels-int8": ["lmx", "--kernels", "on"],  # LMX_CPU_INT8=1 (see ENV)
    "lmx-1thread": ["lmx"],  # OPENBLAS_NUM_THREADS=1 (see ENV)
    "lmx-compiled": ["lmx", "--compile", "on"],
    "lmx-eager": ["lmx", "--compile", "off"],
    "lmx-bf16": ["lmx", "--dtype", "bfloat16"],
    "mlx-lm-default": ["mlx-lm"],
    "mlx-lm-openblas": ["mlx-lm", "--openblas"],
    "llama.cpp": ["llama.cpp"],
    "transformers": ["transformers"],
}
# name -> extra environment of its worker process.
ENV = {
    "lmx-1thread": {"OPENBLAS_NUM_THREADS": "1"},
    "lmx-kernels-1thread": {"LMX_CPU_THREADS": "1"},
    "lmx-kernels-int8": {"LMX_CPU_INT8": "1"},
}
DEFAULT = "lmx,lmx-1thread,mlx-lm-default,mlx-lm-openblas,llama.cpp,transformers"


def measure(engine: str, model_dir: str, gguf: str, args: argparse.Namespace) -> dict:
    root = HERE.parent
    if engine == "lmx-kernels-baseline":
        if not args.baseline_src:
            return {"engine": engine, "error": ["lmx-kernels-baseline needs --baseline-src DIR"]}
        root = Path(args.baseline_src).resolve()
    # The worker from this tree (the same measurement), the lmx package from `root`.
    cmd = [sys.executable, str(HERE / "workers.py"), *ENGINES[engine]]
    cmd += ["--model", model_dir, "--gguf", gguf, "--threads", str(args.threads)]
    cmd += ["--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens)]
    env = {**os.environ, "PYTHONPATH": str(root / "src"), **ENV.get(engine, {})}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if out.returncode != 0:
        return {"engine": engine, "error": out.stderr.strip().splitlines()[-1:] or ["failed"]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", default=DEFAULT, help=f"comma-separated, from: {', '.join(ENGINES)}")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2, help="llama.cpp and torch threads")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per measurement")
    p.add_argument("--baseline-src", default=None, help="source tree (with built kernels) of lmx-kernels-baseline")
    p.add_argument("--json", default=None, help="write every measurement and the medians here")
    args = p.parse_args()
    sys.path.insert(0, str(HERE.parent / "src"))
    from lmx.loading.default_model import default_gguf_path, default_model_path

    model_dir, gguf = str(default_model_path()), str(default_gguf_path())
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        p.error(f"unknown engines {unknown}; known: {', '.join(ENGINES)}")
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    for r in range(args.rounds):
        order = engines[r % len(engines) :] + engines[: r % len(engines)]
        for engine in order:
            res = measure(engine, model_dir, gguf, args)
            runs[engine].append(res)
            shown = {k: round(v, 2) if isinstance(v, float) else v for k, v in res.items() if k != "pid"}
            print(f"round {r + 1} {engine}: {shown}", file=sys.stderr, flush=True)

    def med(engine: str, key: str) -> float:
        vals = [x[key] for x in runs[engine] if key in x]
        return statistics.median(vals) if vals else float("nan")

    base_dec, base_pre = med(engines[0], "decode_tokens_per_s"), med(engines[0], "prefill_tokens_per_s")
    print(f"\nGemma 3 270M, {args.prompt_tokens}-token prompt, {args.gen_tokens} generated, medians of {args.rounds}")
    print(
        f"{'engine':18} {'decode tok/s':>12} {'prefill tok/s':>13} {'TTFT ms':>8}  {engines[0]}/engine decode  prefill"
    )
    for e in engines:
        dec, pre = med(e, "decode_tokens_per_s"), med(e, "prefill_tokens_per_s")
        print(
            f"{e:18} {dec:12.2f} {pre:13.1f} {med(e, 'time_to_first_token_s') * 1e3:8.0f}"
            f"  {base_dec / dec:20.2f}x {base_pre / pre:7.2f}x"
        )
    if args.json:
        summary = {
            e: {k: med(e, k) for k in ("decode_tokens_per_s", "prefill_tokens_per_s", "time_to_first_token_s")}
            for e in engines
        }
        meta = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": platform.platform(),
            "cpus": os.cpu_count(),
            "command": " ".join(sys.argv),
        }
        Path(args.json).write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

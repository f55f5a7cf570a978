"""A GGUF model held quantized (MLX affine layers) against dequantized to float, on one device.

    python benchmarks/gguf_gpu.py [--model FILE.gguf] [--device gpu|cpu] [--dtype auto]
        [--modes quantized,float] [--prompt-tokens 512] [--gen-tokens 128] [--rounds 3]
        [--random 270m|1b] [--json out.json]

Each mode loads in a fresh subprocess (``gguf_on_device=<mode>``, lmx's CPU kernels off, so on the
CPU too the model runs on MLX's own ops) and reports its weights bytes, load seconds, the median
prefill and decode tokens/s over ``--rounds`` greedy generations (a prompt of ``--prompt-tokens``
tokens, ``--gen-tokens`` new ones, EOS masked so every round decodes them all), and 16 greedy
tokens of a short prompt plus that prompt's last logits. The parent prints one JSON object: the
modes, their ratios, whether the greedy tokens agree and the largest logit difference to the float
mode. Default model: the bundled Gemma 3 270M Q4_K_M file; ``--random 1b`` first writes a Gemma 3
1B-shaped Q4_K_M file of random weights (``gguf_random.py``: needs only the ``gguf`` package, so it
runs on a machine the real file cannot reach) and measures that, with token-id prompts.
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
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHECK_PROMPT = "The capital of France is Paris. The capital of Germany is"
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "bright",
    "stars",
    "watch",
    "quietly",
    "above",
]


def worker(args: argparse.Namespace) -> dict:
    import lmx  # isort: skip  (first: on Linux it routes MLX's BLAS calls to OpenBLAS before mlx.core loads)
    import mlx.core as mx
    import numpy as np

    start = time.perf_counter()
    engine = lmx.load(args.model, device=args.device, dtype=args.dtype, cpu_kernels=False, gguf_on_device=args.mode)
    load_s = time.perf_counter() - start
    info = engine.info()
    tok = engine.loaded.tokenizer
    no_eos = {int(t): -100.0 for t in tok.eos_token_ids}
    if args.synthetic:  # a random file's vocabulary is noise: prompts are token ids
        ids = [300 + (i * 7919) % 200_000 for i in range(args.prompt_tokens + args.rounds)]
        check_prompt: str | list[int] = ids[:12]
    else:
        text = " ".join(WORDS[i % len(WORDS)] for i in range(args.prompt_tokens + args.rounds))
        ids = tok.encode(text)[: args.prompt_tokens + args.rounds]
        check_prompt = CHECK_PROMPT
    engine.generate(ids[:16], max_tokens=4, temperature=0.0)  # warm up: compile, allocate
    prefill, decode = [], []
    for r in range(args.rounds):
        c = engine.generate(
            ids[r : r + args.prompt_tokens], max_tokens=args.gen_tokens, temperature=0.0, logit_bias=no_eos
        )
        prefill.append(c.metrics.prefill_tokens_per_s)
        decode.append(c.metrics.decode_tokens_per_s)
    check = engine.generate(check_prompt, max_tokens=16, temperature=0.0)
    prompt = mx.array([check_prompt if isinstance(check_prompt, list) else tok.encode(check_prompt)])
    logits = engine.loaded.model(prompt)[0, -1].astype(mx.float32)
    np.save(args.logits_out, np.array(logits))
    out = {
        "mode": args.mode,
        "profile": info.profile,
        "runs_as": info.runs_as,
        "affine_types": info.affine_types,
        "weights_bytes": info.weights_bytes,
        "num_parameters": info.num_parameters,
        "load_s": round(load_s, 2),
        "prefill_tokens_per_s": round(statistics.median(prefill), 1),
        "decode_tokens_per_s": round(statistics.median(decode), 2),
        "prefill_runs": [round(x, 1) for x in prefill],
        "decode_runs": [round(x, 2) for x in decode],
        "peak_memory": int(mx.get_peak_memory()),
        "greedy_tokens": list(check.tokens),
        "greedy_text": check.text,
    }
    engine.close()
    return out


def run_mode(mode: str, args: argparse.Namespace, logits_path: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--mode", mode, "--logits-out", logits_path]
    cmd += ["--model", args.model, "--device", args.device, "--dtype", args.dtype]
    cmd += ["--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens)]
    cmd += ["--rounds", str(args.rounds)] + (["--synthetic"] if args.random else [])
    # lmx from this tree, ahead of whatever the parent found mlx (and the rest) through
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent / "src"), os.environ.get("PYTHONPATH")])),
    }
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"mode": mode, "error": [f"ran past --timeout {args.timeout} s"]}
    if out.returncode != 0:
        return {"mode": mode, "error": out.stderr.strip().splitlines()[-3:] or ["failed"]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a .gguf file (default: the bundled Gemma 3 270M Q4_K_M)")
    p.add_argument("--device", default="gpu", choices=["cpu", "gpu"])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--modes", default="quantized,float")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--timeout", type=int, default=1800, help="seconds per mode")
    p.add_argument("--random", default=None, choices=["270m", "1b"], help="measure a random Gemma 3 file of this size")
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument("--synthetic", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="quantized", help=argparse.SUPPRESS)
    p.add_argument("--logits-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    import numpy as np

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    results, logits = [], {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.random:
            sys.path.insert(0, str(HERE))
            from gguf_random import write

            args.model = str(write(Path(tmp) / f"random-gemma3-{args.random}.gguf", args.random))
            print(f"wrote {args.model} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        elif args.model is None:
            sys.path.insert(0, str(HERE.parent / "src"))
            from lmx.loading.default_model import default_gguf_path

            args.model = str(default_gguf_path())
        for mode in modes:
            path = str(Path(tmp) / f"{mode}.npy")
            results.append(run_mode(mode, args, path))
            print(f"{mode} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
            if "error" not in results[-1]:
                logits[mode] = np.load(path)
    by_mode = {r["mode"]: r for r in results if "error" not in r}
    compare = {}
    if "quantized" in by_mode and "float" in by_mode:
        q, f = by_mode["quantized"], by_mode["float"]
        compare = {
            "weights_bytes_ratio": round(q["weights_bytes"] / f["weights_bytes"], 3),
            "decode_speedup": round(q["decode_tokens_per_s"] / f["decode_tokens_per_s"], 3),
            "prefill_speedup": round(q["prefill_tokens_per_s"] / f["prefill_tokens_per_s"], 3),
            "greedy_tokens_equal": q["greedy_tokens"] == f["greedy_tokens"],
            "max_abs_logit_diff": float(np.abs(logits["quantized"] - logits["float"]).max()),
            "float_logit_range": float(np.abs(logits["float"]).max()),
        }
    report = {
        "benchmark": "gguf_gpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "model": f"random Gemma 3 {args.random} (gguf_random.py)" if args.random else args.model,
        "device": args.device,
        "dtype": args.dtype,
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "rounds": args.rounds,
        "modes": results,
        "quantized_vs_float": compare,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

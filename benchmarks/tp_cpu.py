"""Tensor or pipeline parallel on this CPU: the bundled Gemma 3 270M at N=1 and N=2 ranks (ring over localhost), interleaved.

Each measurement is a fresh set of processes: N=1 is one ``python`` running ``lmx.load(...,
tensor_parallel=1)`` (the same float32 path as N=2: dequantized weights, MLX's ops, no CPU
kernels); N=2 is two processes under ``mlx.launch --backend ring`` on 127.0.0.1. The two take
turns within each round, the order alternating, so load on the shared machine falls on both.
Each run warms up once, then prefills a prompt of ``--prompt-tokens`` and decodes
``--gen-tokens`` greedily, ``--repeats`` times; rank 0 reports the engine's own metrics.

``--modes`` picks what is compared: ``1`` (one process), ``tp2`` (tensor parallel over 2 ranks),
``pp2`` (pipeline parallel over 2 ranks: layers 0-8 with the embedding/LM head on rank 0, 9-17 on
rank 1), taking turns in that order and its reverse.

Usage::

    .venv/bin/python benchmarks/tp_cpu.py --rounds 3 --json benchmarks/tp_cpu_2026-12-05.json
    .venv/bin/python benchmarks/tp_cpu.py --modes 1,pp2 --rounds 3 --json benchmarks/pp_cpu_2026-12-05.json
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
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _split(mode: str) -> tuple[int, dict]:
    """The ranks and ``lmx.load`` keywords of a mode (``1``, ``tp2``, ``pp2``)."""
    if mode == "1":
        return 1, {"tensor_parallel": 1}
    kind, n = mode[:2], int(mode[2:])
    return n, {"tensor_parallel" if kind == "tp" else "pipeline_parallel": n}


def worker(out: str, mode: str, prompt_tokens: int, gen_tokens: int, repeats: int) -> None:
    """One rank: load, warm up, measure (rank 0 writes ``out``)."""
    import time

    import lmx  # first: it routes MLX's BLAS to OpenBLAS before mlx.core loads  # isort: skip
    import mlx.core as mx

    from lmx.runtime.distributed import join_group

    group = join_group()
    latency = None
    if group.size > 1:  # one all-reduce of a token's residual stream (640 floats), as a layer does twice
        x = mx.ones((1, 640))
        mx.eval(group.all_sum(x))
        t = time.perf_counter()
        for _ in range(50):
            mx.eval(group.all_sum(x))
        latency = (time.perf_counter() - t) / 50
    _, split = _split(mode)
    engine = lmx.load(None, cpu_kernels=False, **split)
    if not engine.is_leader:
        Path(f"{out}.rank{group.rank}").write_text(str(engine.info().weights_bytes))
        engine.follow()
        return
    with engine:
        prompt = list(range(1000, 1000 + prompt_tokens))  # ids, no tokenizer in the way
        engine.generate([2, *prompt[:8]], max_tokens=4)  # warm-up: first graphs, allocator
        runs = []
        for i in range(repeats):
            # a different first token each time: no prefix-cache hit
            done = engine.generate([2, 10 + i, *prompt], max_tokens=gen_tokens, temperature=0.0)
            m = done.metrics
            runs.append(
                {
                    "prefill_tok_s": m.prefill_tokens_per_s,
                    "decode_tok_s": m.decode_tokens_per_s,
                    "ttft_s": m.time_to_first_token,
                    "generated": m.generated_tokens,
                }
            )
        info = engine.info()
    record = {"mode": mode, "runs": runs, "weights_bytes": info.weights_bytes, "all_sum_latency_s": latency}
    Path(out).write_text(json.dumps(record))


def measure(mode: str, args: argparse.Namespace) -> dict:
    from lmx.runtime.distributed import launch_command

    n, _ = _split(mode)
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rank0.json")
        words = [str(HERE / "tp_cpu.py"), "--worker", out, "--mode", mode]
        words += ["--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens)]
        words += ["--repeats", str(args.repeats)]
        command = [sys.executable, *words]
        if n > 1:
            command = launch_command(n, command)
        env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src")}
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
        if proc.returncode != 0 or not Path(out).is_file():
            return {"mode": mode, "error": (proc.stderr.strip().splitlines() or ["failed"])[-3:]}
        record = json.loads(Path(out).read_text())
        record["weights_bytes_other_ranks"] = [int(Path(f"{out}.rank{r}").read_text()) for r in range(1, n)]
        return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2, help="measured requests per run")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--json", default=None)
    p.add_argument("--modes", default="1,tp2", help="what to compare, in turn: 1, tp2, pp2 (comma-separated)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="1", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.mode, args.prompt_tokens, args.gen_tokens, args.repeats)
        return
    modes = args.modes.split(",")
    results: dict[str, list[dict]] = {m: [] for m in modes}
    started = datetime.datetime.now(datetime.timezone.utc)
    for r in range(args.rounds):
        for mode in modes if r % 2 == 0 else modes[::-1]:
            res = measure(mode, args)
            results[mode].append(res)
            print(f"round {r + 1} {mode}: {json.dumps(res)}", file=sys.stderr, flush=True)
    summary = {}
    for n, runs in results.items():
        ok = [x for res in runs if "runs" in res for x in res["runs"]]
        if not ok:
            summary[n] = {"error": [res.get("error") for res in runs]}
            continue
        summary[n] = {
            "prefill_tok_s": statistics.median(x["prefill_tok_s"] for x in ok),
            "decode_tok_s": statistics.median(x["decode_tok_s"] for x in ok),
            "ttft_s": statistics.median(x["ttft_s"] for x in ok),
            "weights_bytes_rank0": next(res["weights_bytes"] for res in runs if "runs" in res),
            "weights_bytes_other_ranks": next(res["weights_bytes_other_ranks"] for res in runs if "runs" in res),
            "samples": len(ok),
            "all_sum_latency_s": [res.get("all_sum_latency_s") for res in runs if "runs" in res],
        }
    print("| mode | prefill tok/s | decode tok/s | TTFT | weights per rank |")
    print("|---|---|---|---|---|")
    for n, s in summary.items():
        if "error" in s:
            print(f"| {n} | error: {s['error']} | | | |")
            continue
        per_rank = [s["weights_bytes_rank0"], *s["weights_bytes_other_ranks"]]
        print(
            f"| {n} | {s['prefill_tok_s']:.1f} | {s['decode_tok_s']:.2f} | {s['ttft_s']:.2f} s "
            f"| {' / '.join(f'{b / 2**20:.0f}' for b in per_rank)} MiB |"
        )
    if args.json:
        record = {
            "started": started.isoformat(timespec="seconds"),
            "machine": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
            "settings": {k: getattr(args, k) for k in ("rounds", "repeats", "prompt_tokens", "gen_tokens", "modes")},
            "summary": summary,
            "results": results,
        }
        Path(args.json).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()

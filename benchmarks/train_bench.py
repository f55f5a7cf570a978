"""LoRA training throughput and peak memory: lmx against mlx-lm's ``lora`` trainer, in one run.

Both engines train the same model on the same token sequences (tokenized once, here, with
lmx's tokenizer) with the same settings: LoRA rank/scale/targets/layers, AdamW, batch size,
sequence length, no gradient checkpointing, no validation. Each measurement is a fresh
subprocess so each gets its own peak memory; engines take turns within each round so load on
the shared machine falls on both alike. The first ``--skip`` steps (compilation, warm-up) are
left out of the throughput. Tokens are the tokens scored in the loss (mlx-lm's definition).

mlx-lm is a benchmark-only dependency (``pip install -e .[bench]``); ``mlx-lm-openblas``
loads OpenBLAS before ``mlx.core`` the way lmx does, so the comparison is of the trainers,
not of the BLAS.

Usage::

    .venv/bin/python benchmarks/train_bench.py                       # tiny random Qwen 3
    .venv/bin/python benchmarks/train_bench.py --model default --seq-len 128 --iters 12
    .venv/bin/python benchmarks/train_bench.py --model DIR --rounds 3 --json out.json
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
from typing import Any

HERE = Path(__file__).resolve().parent
ENGINES = {"lmx": [], "mlx-lm-openblas": ["--openblas"], "mlx-lm-default": []}
DEFAULT_ENGINES = "lmx,mlx-lm-openblas"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WORDS = [
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "is",
    "for",
    "on",
    "with",
    "as",
    "by",
    "at",
    "from",
    "that",
    "this",
    "it",
    "be",
    "are",
    "was",
    "were",
    "model",
    "data",
    "train",
    "token",
    "loss",
    "step",
    "layer",
    "weight",
    "river",
    "mountain",
    "city",
    "light",
    "music",
    "garden",
    "window",
    "paper",
    "story",
    "number",
    "green",
    "blue",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "morning",
    "evening",
    "north",
    "south",
    "learn",
    "write",
    "read",
    "think",
    "build",
]


# ---------------------------------------------------------------------- workers


def _batches(n_examples: int, batch_size: int, iters: int) -> list[list[int]]:
    return [[(i * batch_size + j) % n_examples for j in range(batch_size)] for i in range(iters)]


def worker_lmx(args: argparse.Namespace) -> dict[str, Any]:
    import lmx  # noqa: F401  # first: OpenBLAS before mlx.core
    from lmx.train import TrainConfig, Trainer

    config = TrainConfig(
        model=args.model,
        data=args.data,
        adapter_path=args.out,
        rank=args.rank,
        alpha=args.alpha,
        num_layers=args.num_layers,
        lr=1e-4,
        schedule="constant",
        grad_clip=0.0,
        weight_decay=0.0,
        batch_size=args.batch_size,
        iters=args.iters,
        max_seq_len=args.seq_len,
        val_every=0,
        save_every=0,
        quiet=True,
    )
    trainer = Trainer(config)
    times, tokens, peaks, losses = [], [], [], []
    t = time.perf_counter()
    for report in trainer.steps():
        now = time.perf_counter()
        times.append(now - t)
        tokens.append(report.target_tokens)
        peaks.append(report.peak_memory)
        losses.append(report.loss)
        t = time.perf_counter()
    return _summary(args, times, tokens, max(peaks[args.skip :]), losses)


def worker_mlx_lm(args: argparse.Namespace) -> dict[str, Any]:
    if args.openblas:
        import lmx.runtime  # noqa: F401  # loads OpenBLAS globally, as lmx does, before mlx.core
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm import load
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.trainer import TrainingArgs, train
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = load(args.model)
    ids = json.loads(Path(args.ids).read_text())
    dataset = [(seq, 0) for seq in ids]  # (tokens, prompt offset): every token but the first is scored
    model.freeze()
    n_layers = len(model.layers) if args.num_layers == -1 else args.num_layers
    lora = {"rank": args.rank, "scale": args.alpha / args.rank, "dropout": 0.0, "keys": None}
    linear_to_lora_layers(
        model, n_layers, {**lora, "keys": [f"self_attn.{k}" for k in TARGETS[:4]] + [f"mlp.{k}" for k in TARGETS[4:]]}
    )

    class Recorder(TrainingCallback):
        def __init__(self) -> None:
            self.reports: list[dict[str, Any]] = []

        def on_train_loss_report(self, info: dict[str, Any]) -> None:
            self.reports.append(info)

    recorder = Recorder()
    training = TrainingArgs(
        batch_size=args.batch_size,
        iters=args.iters,
        steps_per_report=1,
        steps_per_eval=10**9,
        steps_per_save=10**9,
        max_seq_length=args.seq_len,
        adapter_file=str(Path(args.out) / "adapters.safetensors"),
    )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    mx.reset_peak_memory()
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # mlx-lm's progress UI
        train(
            model,
            optim.AdamW(learning_rate=1e-4, weight_decay=0.0),
            dataset,
            None,
            training,
            training_callback=recorder,
        )
    times = [(r["trained_tokens"] - prev) / r["tokens_per_second"] for r, prev in _with_prev(recorder.reports)]
    tokens = [r["trained_tokens"] - prev for r, prev in _with_prev(recorder.reports)]
    losses = [r["train_loss"] for r in recorder.reports]
    return _summary(args, times, tokens, int(mx.get_peak_memory()), losses)


def _with_prev(reports: list[dict[str, Any]]) -> list[tuple[dict[str, Any], int]]:
    prev = [0] + [r["trained_tokens"] for r in reports[:-1]]
    return list(zip(reports, prev))


def _summary(args: argparse.Namespace, times: list[float], tokens: list[int], peak: int, losses: list[float]) -> dict:
    t, n = times[args.skip :], tokens[args.skip :]
    return {
        "tokens_per_s": sum(n) / sum(t),
        "step_s": statistics.median(t),
        "peak_memory_mib": peak / 2**20,
        "steps": len(times),
        "tokens_per_step": statistics.median(tokens),
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


# ---------------------------------------------------------------------- driver


def _make_data(model: str, out: Path, n: int, seq_len: int, seed: int) -> tuple[Path, Path]:
    import random

    import lmx  # noqa: F401
    from lmx.tokenizer import load_tokenizer
    from lmx.train.data import load_jsonl

    rng = random.Random(seed)
    rows = [{"text": " ".join(rng.choice(WORDS) for _ in range(seq_len * 2)).capitalize() + "."} for _ in range(n)]
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = load_tokenizer(model)
    ds = load_jsonl(data / "train.jsonl", tokenizer, max_seq_len=seq_len)
    ids = out / "ids.json"
    ids.write_text(json.dumps([e.tokens.tolist() for e in ds.examples]))
    return data, ids


def _tiny_model(out: Path) -> Path:
    sys.path.insert(0, str(HERE.parent / "tests"))
    from tiny_models import save_tiny  # needs torch + transformers (the test extra)

    d = out / "tiny-qwen3"
    d.mkdir(parents=True, exist_ok=True)
    save_tiny("qwen3", d)  # mlx-lm's gemma3_text needs sliding_window_pattern layers; the tiny Gemma has 4
    return d


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="HF model dir, 'default' (bundled Gemma 3 270M) or 'tiny'")
    p.add_argument("--engines", default=DEFAULT_ENGINES, help=f"comma-separated: {', '.join(ENGINES)}")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--skip", type=int, default=3, help="steps left out of the throughput")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--num-layers", type=int, default=-1)
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--blas-threads", type=int, default=None, help="OPENBLAS_NUM_THREADS for every worker")
    p.add_argument("--json", default=None, help="also write the results here")
    # worker mode
    p.add_argument("--worker", choices=["lmx", "mlx-lm"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--openblas", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ids", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        result = worker_lmx(args) if args.worker == "lmx" else worker_mlx_lm(args)
        print("RESULT " + json.dumps(result))
        return 0

    engines = [e for e in args.engines.split(",") if e]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        p.error(f"unknown engine(s) {unknown}; choose from {', '.join(ENGINES)}")
    with tempfile.TemporaryDirectory(prefix="lmx-train-bench-") as tmp:
        work = Path(tmp)
        if args.model == "tiny":
            model = str(_tiny_model(work))
        elif args.model == "default":
            import lmx  # noqa: F401
            from lmx.loading.default_model import default_model_path

            model = str(default_model_path())
        else:
            model = args.model
        data, ids = _make_data(model, work, args.examples, args.seq_len, seed=0)
        results: dict[str, list[dict[str, Any]]] = {e: [] for e in engines}
        for rnd in range(args.rounds):
            order = engines[rnd % len(engines) :] + engines[: rnd % len(engines)]
            for engine in order:
                worker = "lmx" if engine.startswith("lmx") else "mlx-lm"
                cmd = [sys.executable, __file__, "--worker", worker, *ENGINES[engine], "--model", model]
                cmd += ["--data", str(data), "--ids", str(ids), "--out", str(work / f"out-{engine}-{rnd}")]
                for flag in ("iters", "skip", "batch_size", "seq_len", "rank", "alpha", "num_layers"):
                    cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
                env = dict(os.environ)
                if args.blas_threads:
                    env["OPENBLAS_NUM_THREADS"] = str(args.blas_threads)
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if proc.returncode != 0 or line is None:
                    print(f"{engine} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}", file=sys.stderr)
                    return 1
                result = json.loads(line[len("RESULT ") :])
                results[engine].append(result)
                print(
                    f"round {rnd + 1} {engine:16s} {result['tokens_per_s']:9.1f} tok/s  "
                    f"peak {result['peak_memory_mib']:8.1f} MiB  loss {result['first_loss']:.3f} -> {result['last_loss']:.3f}",
                    file=sys.stderr,
                )
    base = statistics.median(r["tokens_per_s"] for r in results[engines[0]])
    header = (
        f"model={args.model} batch={args.batch_size} seq={args.seq_len} rank={args.rank} "
        f"iters={args.iters} (skip {args.skip}) blas_threads={args.blas_threads or 'default'}"
    )
    lines = [header, "", "| engine | tokens/s (median) | vs first | peak memory MiB |", "|---|---:|---:|---:|"]
    for engine in engines:
        tps = statistics.median(r["tokens_per_s"] for r in results[engine])
        mem = statistics.median(r["peak_memory_mib"] for r in results[engine])
        lines.append(f"| {engine} | {tps:.1f} | {tps / base:.2f}x | {mem:.1f} |")
    print("\n".join(lines))
    if args.json:
        record = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.platform(),
            "cpus": os.cpu_count(),
            "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "openblas", "data", "ids", "out")},
            "results": results,
        }
        Path(args.json).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

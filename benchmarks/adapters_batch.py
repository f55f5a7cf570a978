"""Requests split across two LoRA adapters and the base model: served mixed in one batch, or
one adapter at a time.

    python benchmarks/adapters_batch.py [--model PATH | --config NAME] [--device cpu|gpu]
        [--requests 12] [--max-tokens 64] [--rank 8] [--repeat 2] [--json out.json]

``--config`` (``lmx bench``'s shapes, e.g. ``gemma3-270m``) runs random weights of that shape with
a word-level tokenizer of its vocabulary (for a GPU host, where the bundled GGUF is not at hand).

Two adapters of random weights (rank ``--rank`` on every attention and MLP projection) are
written for the model and loaded by name. ``--requests`` requests (a different prompt each,
greedy, ``--max-tokens`` tokens) go a third each to adapter ``a``, adapter ``b`` and the base
model, and are served three ways:

- ``mixed``: all at once; rows of every adapter share each decode step (LoRA applied per row);
- ``per_adapter``: one adapter's requests at once (batched), then the next's, as a server that
  holds one adapter at a time must;
- ``base_only``: the same number of requests on the base model alone, all at once (the cost of
  LoRA itself, next to no adapter at all).

Each is run ``--repeat`` times (the best is kept) with the prefix cache off. Prints one JSON
object: generated tokens, seconds and tokens/s for each, and whether every mixed row's tokens
equal its row in ``per_adapter`` (greedy: they should).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

import lmx
from lmx.runtime.files import write_bytes
from lmx.train.lora import AdapterConfig, atomic_save_safetensors, linear_shape, target_paths

TOPICS = ["the ocean", "a lighthouse", "mountains", "a library", "rain", "trains", "bees", "the moon", "a river"]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapter(engine: lmx.Engine, out: Path, rank: int, seed: int) -> Path:
    """An adapter of random weights (small, nonzero ``B``) for every projection of the model."""
    rng = np.random.default_rng(seed)
    named = dict(engine.model.named_modules())
    paths = target_paths(engine.model, TARGETS)
    weights = {}
    for path in paths:
        out_dims, in_dims = linear_shape(named[path])
        weights[f"{path}.lora_a"] = mx.array(rng.uniform(-1, 1, (in_dims, rank)).astype(np.float32) / in_dims**0.5)
        weights[f"{path}.lora_b"] = mx.array(rng.normal(0, 0.02, (rank, out_dims)).astype(np.float32))
    atomic_save_safetensors(out / "adapters.safetensors", weights)
    config = AdapterConfig(rank=rank, alpha=2.0 * rank, modules=tuple(paths))
    write_bytes(out / "adapter_config.json", json.dumps(config.as_dict()).encode())
    return out


def random_engine(name: str, max_batch: int) -> lmx.Engine:
    """An engine on random weights of ``lmx bench``'s config ``name``, with a tokenizer of as many
    words as its vocabulary (no file needed: the text is irrelevant here)."""
    import tokenizers

    from lmx.bench import config_for, random_weights
    from lmx.loading import LoadedModel, resolve_dtype
    from lmx.loading.loader import load_profile, profile_ops
    from lmx.models import build_model
    from lmx.tokenizer import Tokenizer

    config = config_for(name)
    model = build_model(config, f"config {name}")
    profile = load_profile("auto")
    random_weights(model, resolve_dtype("auto"))
    model.set_ops(profile_ops(profile))
    words = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"w{i}" for i in range(int(config["vocab_size"]) - 4)]
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.decoder = tokenizers.decoders.WordPiece()
    tokenizer = Tokenizer(backend, bos_token="<bos>", eos_tokens=["<eos>"], pad_token="<pad>", name=name)
    loaded = LoadedModel(model=model, tokenizer=tokenizer, config=config, source=name, name=name, profile=profile)
    return lmx.Engine(loaded, prompt_cache=False, max_batch=max_batch)


def serve(engine: lmx.Engine, jobs: list[tuple[str, str | None]], max_tokens: int) -> tuple[float, list[list[int]]]:
    """Submit every job at once, wait for all; return the seconds and each job's tokens."""
    start = time.perf_counter()
    streams = [engine.stream(prompt, max_tokens=max_tokens, adapter=adapter) for prompt, adapter in jobs]
    tokens = [[t.id for t in s] for s in streams]
    return time.perf_counter() - start, tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the bundled Gemma 3 270M")
    p.add_argument("--config", default=None, help="random weights of this lmx bench shape instead of --model")
    p.add_argument("--device", default=None, choices=["cpu", "gpu"])
    p.add_argument("--requests", type=int, default=12)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.config:
        from lmx.runtime.device import choose_device

        choose_device(args.device)
        engine = random_engine(args.config, max(32, args.requests))
    else:
        engine = lmx.load(args.model, device=args.device, prompt_cache=False, max_batch=max(32, args.requests))
    with tempfile.TemporaryDirectory() as tmp:
        written = {
            name: write_adapter(engine, Path(tmp) / name, args.rank, seed) for name, seed in (("a", 1), ("b", 2))
        }
        for name, path in written.items():
            engine.load_adapter(path, name=name)
    names = ["a", "b", None]
    jobs = [
        (f"Write a short story about {TOPICS[i % len(TOPICS)]} (number {i}).", names[i % 3])
        for i in range(args.requests)
    ]
    for adapter in names:  # warm up each path (first graphs, kernels)
        engine.generate("warm up", max_tokens=4, adapter=adapter)
    serve(engine, jobs[:3], 4)

    results: dict[str, dict] = {}
    per_tokens: dict[int, list[int]] = {}
    mixed_tokens: list[list[int]] = []
    for _ in range(args.repeat):
        seconds, mixed_tokens = serve(engine, jobs, args.max_tokens)
        best = results.get("mixed")
        if best is None or seconds < best["seconds"]:
            results["mixed"] = {"seconds": seconds, "tokens": sum(map(len, mixed_tokens))}
        total, count = 0.0, 0
        for adapter in names:
            group = [i for i, (_, a) in enumerate(jobs) if a == adapter]
            seconds, tokens = serve(engine, [jobs[i] for i in group], args.max_tokens)
            total += seconds
            count += sum(map(len, tokens))
            per_tokens.update(zip(group, tokens))
        best = results.get("per_adapter")
        if best is None or total < best["seconds"]:
            results["per_adapter"] = {"seconds": total, "tokens": count}
        seconds, tokens = serve(engine, [(prompt, None) for prompt, _ in jobs], args.max_tokens)
        best = results.get("base_only")
        if best is None or seconds < best["seconds"]:
            results["base_only"] = {"seconds": seconds, "tokens": sum(map(len, tokens))}
    for r in results.values():
        r["tokens_per_s"] = round(r["tokens"] / r["seconds"], 1)
        r["seconds"] = round(r["seconds"], 3)
    info = engine.info()
    report = {
        "benchmark": "adapters_batch",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "device": info.device,
        "model": info.name,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "rank": args.rank,
        "results": results,
        "mixed_over_per_adapter": round(results["mixed"]["tokens_per_s"] / results["per_adapter"]["tokens_per_s"], 2),
        "mixed_over_base_only": round(results["mixed"]["tokens_per_s"] / results["base_only"]["tokens_per_s"], 2),
        "mixed_rows_equal_per_adapter_rows": all(mixed_tokens[i] == per_tokens[i] for i in range(len(jobs))),
        "max_batch_seen": engine.stats().max_batch_seen,
    }
    engine.close()
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()

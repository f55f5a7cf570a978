"""``lmx bench --against mlx-lm``: lmx and mlx-lm on the same weights and device, interleaved.

One process: the mlx-lm model of the same architecture is given lmx's weight arrays (no copy),
so both read identical bytes, on the same MLX build. Then, in rounds whose order rotates, each
generates greedily from the same random prompt without stopping at end-of-sequence; both are
timed from outside by the same definitions (benchmarks/RESULTS.md): ``t_k`` is when token k is
readable on the host; prefill tok/s = prompt tokens / (t_1 - start); decode tok/s = (n - 1) /
(t_n - t_1). lmx runs as it loads on the device (its profile: decode plan, fused projections,
kernels); mlx-lm's ``generate_step`` with its defaults. ``roofline`` also measures the device's
copy bandwidth in the same run and reports decode against bytes of weights per token.

This is how benchmarks/RESULTS.md's GPU headlines against mlx-lm are measured (the script
``benchmarks/gpu_vs_mlx_lm.py`` adds lmx variants with one change undone).
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmx.bench_anchor import Interleaved, prompt_ids, timings
from lmx.errors import InvalidOptionError, ModelNotFoundError

ENGINES = ("lmx", "mlx-lm")
KEYS = ("decode_tokens_per_s", "prefill_tokens_per_s", "time_to_first_token_s")


def mlx_lm_twin(config: dict[str, Any], model: Any) -> Any:
    """An mlx-lm model of ``config`` holding the same weight arrays as the lmx ``model``."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    arch = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    twin = arch.Model(arch.ModelArgs.from_dict(config))
    if config.get("quantization"):
        q = config["quantization"]
        nn.quantize(twin, group_size=q["group_size"], bits=q["bits"])
    weights = twin.sanitize(dict(tree_flatten(model.parameters())))
    twin.load_weights(list(weights.items()), strict=True)
    mx.eval(twin.parameters())
    return twin


def copy_bandwidth(gib: float, repeats: int = 10) -> float:
    """The device's copy bandwidth in bytes/s: ``x + 1`` over a ``gib``-GiB bf16 array reads it once
    and writes it once; the median of ``repeats`` timed copies after one warm-up."""
    import mlx.core as mx

    x = mx.zeros((int(gib * 2**30) // 2,), dtype=mx.bfloat16)
    mx.eval(x)
    times = []
    for i in range(repeats + 1):
        t = time.perf_counter()
        y = x + 1
        mx.eval(y)
        if i:
            times.append(time.perf_counter() - t)
        del y
    return 2 * x.nbytes / statistics.median(times)


@dataclass
class AgainstResult(Interleaved):
    """Every round's measurements, the medians and the lmx / mlx-lm ratios."""

    model: str
    device: str
    quantization: int | None
    prompt_tokens: int
    gen_tokens: int
    weights_bytes: int
    same_tokens: int  # leading greedy tokens both engines chose alike (of gen_tokens)
    copy_bandwidth: float | None = None  # bytes/s, measured in the same run (roofline)
    runs: list[dict[str, Any]] = field(default_factory=list)
    anchor = "mlx-lm"

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": self.model,
            "device": self.device,
            "quantization": self.quantization,
            "prompt_tokens": self.prompt_tokens,
            "gen_tokens": self.gen_tokens,
            "weights_bytes": self.weights_bytes,
            "rounds": len({r["round"] for r in self.runs}),
            "same_greedy_tokens": self.same_tokens,
            "medians": {e: {k: self.median(e, k) for k in KEYS} for e in ENGINES},
            "lmx_over_mlx_lm": {k: self.ratio(k) for k in KEYS[:2]},
            "rounds_lmx_faster": {k: self.rounds_won(k) for k in KEYS[:2]},
            "runs": self.runs,
        }
        if self.copy_bandwidth is not None:
            out["copy_bandwidth_bytes_per_s"] = self.copy_bandwidth
            out["roofline"] = {
                e: self.median(e, "decode_tokens_per_s") * self.weights_bytes / self.copy_bandwidth for e in ENGINES
            }
        return out


def run_against_mlx_lm(
    model: str | None = None,
    *,
    config: str | None = None,
    quantize: int | None = None,
    device: str | None = None,
    dtype: str = "auto",
    prompt_tokens: int = 512,
    gen_tokens: int = 128,
    rounds: int = 3,
    roofline: bool = False,
    on_run: Callable[[dict[str, Any]], None] | None = None,
) -> AgainstResult:
    """lmx against mlx-lm on one model (an HF directory, or a ``config``'s random weights).

    Raises:
        InvalidOptionError: a count below its minimum, a GGUF file (mlx-lm does not read one), no
            model and no config, or mlx-lm not installed.
        ModelNotFoundError: the directory does not exist.
    """
    for name, value, low in (("prompt_tokens", prompt_tokens, 1), ("gen_tokens", gen_tokens, 2), ("rounds", rounds, 1)):
        if value < low:
            raise InvalidOptionError(f"{name} must be >= {low}, got {value}")
    if model is None and config is None:
        raise InvalidOptionError("--against mlx-lm needs --config NAME or --model with an HF model directory")
    if model is not None:
        if Path(model).suffix == ".gguf":
            raise InvalidOptionError(
                f"--against mlx-lm needs an HF model directory (mlx-lm reads no GGUF), got {model!r}"
            )
        if not Path(model).is_dir():
            raise ModelNotFoundError(f"no such model directory: {model!r}")
    if importlib.util.find_spec("mlx_lm") is None:
        raise InvalidOptionError("--against mlx-lm needs mlx-lm: pip install 'lmx[bench]'")

    import mlx.core as mx
    from mlx.utils import tree_flatten

    from lmx.bench import greedy_stamps, load_bench_model
    from lmx.generate.step import DecodeState
    from lmx.runtime.device import choose_device, device_name

    choose_device(device)
    loaded = load_bench_model(model, config, dtype, None, quantize)
    twin = mlx_lm_twin(loaded.config, loaded.model)
    state = DecodeState(loaded.model, loaded.profile)
    prompt = prompt_ids(prompt_tokens, loaded.vocab_size)

    def lmx_once(p: list[int], n: int) -> tuple[float, list[float]]:
        return greedy_stamps(loaded.model, mx.array([p]), n, state=state)

    def mlx_lm_once(p: list[int], n: int) -> tuple[float, list[float]]:
        from mlx_lm.generate import generate_step

        start, stamps = time.perf_counter(), []
        for _token, _ in generate_step(mx.array(p), twin, max_tokens=n):
            stamps.append(time.perf_counter())
        return start, stamps

    def greedy_tokens(n: int) -> tuple[list[int], list[int]]:
        from mlx_lm.generate import generate_step as mlx_lm_step

        from lmx.generate.sampling import KeySequence, make_sampler
        from lmx.generate.step import generate_step

        ours = []
        steps = generate_step(
            loaded.model,
            mx.array([prompt]),
            loaded.model.make_cache(),
            make_sampler(0.0),
            KeySequence(0).next,
            state=state,
        )
        for token, _ in steps:
            ours.append(token.item())
            if len(ours) == n:
                break
        steps.close()
        theirs = [int(t) for t, _ in mlx_lm_step(mx.array(prompt), twin, max_tokens=n)]
        return ours, theirs

    weights_bytes = sum(v.nbytes for _, v in tree_flatten(loaded.model.parameters()))
    bandwidth = None
    if roofline:
        bandwidth = copy_bandwidth(2.0 if device_name() == "gpu" else 0.25)
        gc.collect()
        mx.clear_cache()
    ours, theirs = greedy_tokens(gen_tokens)
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    result = AgainstResult(
        loaded.name, device_name(), quantize, prompt_tokens, gen_tokens, weights_bytes, same, bandwidth
    )
    once = {"lmx": lmx_once, "mlx-lm": mlx_lm_once}
    for fn in once.values():  # warm-up: kernels, compiled graphs, allocations
        fn(prompt[:32], 8)
        fn(prompt, 8)
    for r in range(rounds):
        for engine in ENGINES[r % 2 :] + ENGINES[: r % 2]:  # the order rotates
            gc.collect()
            mx.clear_cache()
            run = {"engine": engine, "round": r + 1, **timings(*once[engine](prompt, gen_tokens), prompt_tokens)}
            result.runs.append(run)
            if on_run is not None:
                on_run(run)
    return result

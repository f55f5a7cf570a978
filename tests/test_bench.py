"""``lmx bench`` and :mod:`lmx.bench`: they run and report sane numbers (speed itself lives in benchmarks/).

No timing is asserted here: only that the benchmark runs end to end on tiny random models,
reports every key with a positive value, and rejects bad options with typed errors. The
compiled decode step, a speed change, must give the same tokens as the eager one.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

import lmx  # noqa: F401  # isort: skip
import mlx.core as mx

from lmx import bench
from lmx.cli import bench as bench_cli
from lmx.errors import InvalidOptionError
from lmx.generate.sampling import KeySequence, make_sampler
from lmx.generate.step import DecodeState, generate_step
from lmx.models import build_model

KEYS = {
    "load_time_s",
    "prefill_tokens_per_s",
    "decode_tokens_per_s",
    "time_to_first_token_s",
    "peak_memory_bytes",
    "weights_bytes",
    "kv_cache_bytes",
}


def run_cli(*argv: str) -> tuple[int, argparse.Namespace]:
    parser = argparse.ArgumentParser()
    bench_cli.register(parser.add_subparsers())
    args = parser.parse_args(["bench", *argv])
    return args.func(args), args


@pytest.mark.parametrize(("config", "dtype"), [("tiny-gemma3", "float32"), ("tiny-qwen3", "bfloat16")])
def test_bench_json_reports_positive_numbers(config, dtype, capsys):
    code, _ = run_cli(
        "--config", config, "--prompt-tokens", "40", "--gen-tokens", "6", "--repeat", "2", "--dtype", dtype, "--json"
    )
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) >= KEYS
    assert all(data[k] > 0 for k in KEYS)
    assert data["model"] == config and data["dtype"] == dtype
    assert data["repeat"] == 2 and len(data["runs"]) == 2
    assert data["prompt_tokens"] == 40 and data["gen_tokens"] == 6
    # Peak memory holds at least the weights and the cache the run filled.
    assert data["peak_memory_bytes"] >= data["weights_bytes"] + data["kv_cache_bytes"] * 0.5


def test_bench_batch_and_compiled_step(capsys):
    code, _ = run_cli(
        "--config", "tiny-qwen3", "--batch", "2", "--prompt-tokens", "20", "--gen-tokens", "5", "--repeat", "1"
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "decode:" in text and "tok/s" in text and "batch 2" in text
    result = bench.run_benchmark(config="tiny-gemma3", prompt_tokens=20, gen_tokens=5, repeat=1, compile=True)
    assert result.decode_tokens_per_s > 0 and result.prefill_tokens_per_s > 0


def test_bench_on_a_checkpoint(tiny_dirs):
    result = bench.run_benchmark(tiny_dirs["gemma3"], prompt_tokens=16, gen_tokens=4, repeat=1)
    data = result.as_dict()
    assert data["model"] == str(tiny_dirs["gemma3"])
    assert data["load_time_s"] > 0 and data["decode_tokens_per_s"] > 0


def test_bench_quantized_config():
    result = bench.run_benchmark(config="tiny-qwen3", prompt_tokens=16, gen_tokens=4, repeat=1, quantize=8)
    assert result.quantization == 8 and result.decode_tokens_per_s > 0


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"config": "no-such-model"}, "config"),
        ({"config": "tiny-qwen3", "gen_tokens": 1}, "gen_tokens"),
        ({"config": "tiny-qwen3", "repeat": 0}, "repeat"),
        ({"config": "tiny-qwen3", "batch": 0}, "batch"),
        ({"config": "tiny-qwen3", "quantize": 3}, "quantize"),
        ({"config": "tiny-qwen3", "num_layers": 0}, "num_layers"),
        ({"model": "some/dir", "config": "tiny-qwen3"}, "not both"),
    ],
)
def test_bad_options_are_typed_errors(kwargs, name):
    with pytest.raises(InvalidOptionError, match=name):
        bench.run_benchmark(**{"prompt_tokens": 8, "gen_tokens": 2, "repeat": 1, **kwargs})


def test_named_configs_are_the_published_shapes():
    gemma = bench.config_for("gemma3-270m")
    assert (gemma["hidden_size"], gemma["num_hidden_layers"], gemma["vocab_size"]) == (640, 18, 262144)
    qwen = bench.config_for("qwen3-8b", num_layers=2)
    assert (qwen["hidden_size"], qwen["num_hidden_layers"], qwen["tie_word_embeddings"]) == (4096, 2, False)
    assert bench.CONFIGS["qwen3-8b"]["num_hidden_layers"] == 36  # a copy was cut, not the table


@pytest.mark.parametrize("config", ["tiny-gemma3", "tiny-qwen3", "tiny-qwen3-moe"])
@pytest.mark.parametrize("padded", [False, True])
def test_compiled_decode_equals_eager_decode(config, padded):
    # 300 steps: past the first KV-cache growth (256) and several sliding-window wraps.
    model = build_model(bench.config_for(config))
    bench.random_weights(model, mx.float32, seed=1)
    prompt = mx.random.randint(0, 512, (2, 24), key=mx.random.key(3))
    pad = mx.array([0, 5]) if padded else None

    def run(compile: bool) -> tuple[list[list[int]], np.ndarray]:
        steps = generate_step(
            model, prompt, model.make_cache(), make_sampler(0.0), KeySequence(0).next, pad=pad, compile=compile
        )
        tokens, logprobs = [], []
        for i, (token, lp) in enumerate(steps):
            tokens.append(token.tolist())
            logprobs.append(np.array(lp))
            if i == 299:
                break
        steps.close()
        return tokens, np.stack(logprobs)

    eager, compiled = run(False), run(True)
    assert eager[0] == compiled[0]
    np.testing.assert_allclose(compiled[1], eager[1], atol=1e-4)


def test_compiled_decode_sees_updated_weights():
    model = build_model(bench.config_for("tiny-qwen3"))
    bench.random_weights(model, mx.float32, seed=2)
    prompt = mx.array([[5, 6, 7, 8]])
    state = DecodeState(model)  # the trace of the first call is replayed by the second

    def first_logprobs() -> np.ndarray:
        steps = generate_step(
            model, prompt, model.make_cache(), make_sampler(0.0), KeySequence(0).next, compile=True, state=state
        )
        next(steps)
        _, lp = next(steps)  # the second token comes from the compiled step
        steps.close()
        return np.array(lp)

    before = first_logprobs()
    model.update({"lm_head": {"weight": model.lm_head.weight * 2}})
    assert not np.allclose(first_logprobs(), before)


@pytest.mark.slow
def test_bench_without_a_model_times_the_default_as_lmx_loads_it():
    """`lmx bench` with no model benchmarks what `lmx run` runs: on the CPU with the kernels, the GGUF file."""
    from lmx.kernels import status

    result = bench.run_benchmark(prompt_tokens=8, gen_tokens=2, repeat=1, device="cpu")
    assert result.decode_tokens_per_s > 0
    if status().available:
        assert result.model.endswith(".gguf"), result.model
    else:
        assert not result.model.endswith(".gguf"), result.model


# ---- lmx bench --against llama.cpp (lmx.bench_anchor) ----


def test_against_refuses_what_both_engines_cannot_read(tiny_dirs, tmp_path, monkeypatch):
    from lmx.bench_anchor import run_anchor
    from lmx.errors import ModelNotFoundError

    directory = next(iter(tiny_dirs.values()))
    with pytest.raises(InvalidOptionError, match=r"needs a \.gguf file that both engines read, got '.*'"):
        run_anchor(str(directory))
    with pytest.raises(ModelNotFoundError, match="no such GGUF file: '.*missing.gguf'"):
        run_anchor(str(tmp_path / "missing.gguf"))
    with pytest.raises(InvalidOptionError, match="gen_tokens must be >= 2"):
        run_anchor(str(tmp_path / "missing.gguf"), gen_tokens=1)
    with pytest.raises(InvalidOptionError, match="rounds must be >= 1, got 0"):
        run_anchor(None, rounds=0)
    # without llama-cpp-python (the bench extra): a clear error, before any measurement starts
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "llama_cpp" else real_find_spec(name))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(InvalidOptionError, match=r"needs llama-cpp-python: pip install 'lmx\[bench\]'"):
        run_anchor(str(gguf))
    code, _ = run_cli("--against", "llama.cpp", "--config", "tiny-gemma3")
    assert code == 2


@pytest.mark.slow
def test_against_measures_lmx_in_a_process_of_its_own():
    """The lmx half of `lmx bench --against llama.cpp`: one child process, one JSON line, the
    bundled GGUF as lmx loads it, the counts asked for."""
    import subprocess
    import sys

    from lmx.kernels import status
    from lmx.loading.default_model import default_gguf_path

    cmd = [sys.executable, "-m", "lmx.bench_anchor", "lmx", "--gguf", str(default_gguf_path())]
    out = subprocess.run(
        [*cmd, "--prompt-tokens", "12", "--gen-tokens", "5", "--threads", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    run = json.loads(out.stdout.strip().splitlines()[-1])
    assert run["prompt_tokens"] == 12 and run["gen_tokens"] == 5
    assert run["decode_tokens_per_s"] > 0 and run["prefill_tokens_per_s"] > 0 and run["peak_memory_bytes"] > 0
    assert run["cpu_kernels"] == status().available


# ---- lmx bench --against mlx-lm (lmx.bench_mlx_lm) ----


@pytest.mark.parametrize("config", ["tiny-gemma3", "tiny-qwen3"])
def test_against_mlx_lm_runs_both_on_the_same_weights(config, capsys):
    # the real mlx-lm (the test extra) on the same arrays: in float32 on the CPU both choose the same
    # greedy tokens, which they would not on other weights or another architecture's wiring
    code, _ = run_cli(
        "--against", "mlx-lm", "--config", config, "--device", "cpu", "--rounds", "2",
        "--prompt-tokens", "24", "--gen-tokens", "12", "--roofline", "--json",
    )  # fmt: skip
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["same_greedy_tokens"] == 12
    assert data["rounds"] == 2 and len(data["runs"]) == 4
    assert [r["engine"] for r in data["runs"]] == ["lmx", "mlx-lm", "mlx-lm", "lmx"]  # the order rotates
    for engine in ("lmx", "mlx-lm"):
        decode = [r["decode_tokens_per_s"] for r in data["runs"] if r["engine"] == engine]
        assert data["medians"][engine]["decode_tokens_per_s"] == pytest.approx(float(np.median(decode)))
        assert data["roofline"][engine] == pytest.approx(
            data["medians"][engine]["decode_tokens_per_s"] * data["weights_bytes"] / data["copy_bandwidth_bytes_per_s"]
        )
    ratio = data["medians"]["lmx"]["decode_tokens_per_s"] / data["medians"]["mlx-lm"]["decode_tokens_per_s"]
    assert data["lmx_over_mlx_lm"]["decode_tokens_per_s"] == pytest.approx(ratio)


def test_against_mlx_lm_quantized_and_from_a_directory(tiny_dirs, capsys):
    # 4-bit: both hold the same quantized arrays; an HF directory: lmx loads it, mlx-lm gets its arrays
    code, _ = run_cli(
        "--against", "mlx-lm", "--config", "tiny-qwen3", "--device", "cpu", "--rounds", "1",
        "--prompt-tokens", "16", "--gen-tokens", "6", "--quantize", "4", "--json",
    )  # fmt: skip
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["quantization"] == 4 and data["same_greedy_tokens"] == 6 and "roofline" not in data
    code, _ = run_cli(
        "--against", "mlx-lm", "--model", str(tiny_dirs["qwen3"]), "--device", "cpu", "--rounds", "1",
        "--prompt-tokens", "16", "--gen-tokens", "6",
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "lmx / mlx-lm: decode" in out and "greedy tokens alike: the first 6" in out


def test_against_mlx_lm_refuses_what_it_cannot_run(tmp_path, monkeypatch):
    from lmx.bench_mlx_lm import run_against_mlx_lm
    from lmx.errors import ModelNotFoundError

    with pytest.raises(InvalidOptionError, match="needs --config NAME or --model"):
        run_against_mlx_lm(None)
    with pytest.raises(InvalidOptionError, match=r"mlx-lm reads no GGUF\), got '.*model.gguf'"):
        run_against_mlx_lm(str(tmp_path / "model.gguf"))
    with pytest.raises(ModelNotFoundError, match="no such model directory: '.*nothing'"):
        run_against_mlx_lm(str(tmp_path / "nothing"))
    with pytest.raises(InvalidOptionError, match="gen_tokens must be >= 2, got 1"):
        run_against_mlx_lm(config="tiny-qwen3", gen_tokens=1)
    with pytest.raises(InvalidOptionError, match="rounds must be >= 1, got 0"):
        run_against_mlx_lm(config="tiny-qwen3", rounds=0)
    with pytest.raises(InvalidOptionError, match="config must be one of"):
        run_against_mlx_lm(config="no-such-shape", device="cpu")
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "mlx_lm" else real_find_spec(name))
    with pytest.raises(InvalidOptionError, match=r"needs mlx-lm: pip install 'lmx\[bench\]'"):
        run_against_mlx_lm(config="tiny-qwen3")

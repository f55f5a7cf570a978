"""lmx convert: GGUF / HF dir -> HF-layout dir that loads with the same logits; quantized variant."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from mlx.utils import tree_flatten

import lmx  # isort: skip
import mlx.core as mx

from lmx.errors import InvalidOptionError
from lmx.loading.convert import convert

pytest_plugins = ["conftest_gguf"]


def _logits(engine, ids):
    return np.array(engine.model(mx.array([ids]))[0])


@pytest.mark.slow
def test_converted_gguf_gives_the_same_logits(gemma_gguf, tmp_path):
    out = convert(gemma_gguf, tmp_path / "hf")
    assert {p.name for p in out.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    }
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["architectures"] == ["Gemma3ForCausalLM"]
    with lmx.load(gemma_gguf) as a, lmx.load(gemma_gguf, cpu_kernels=False) as a_float, lmx.load(out) as b:
        text = "The quick brown fox jumps over the lazy dog. 你好 🙂"
        ids = a.tokenizer.encode(text)
        assert b.tokenizer.encode(text) == ids
        assert b.tokenizer.eos_token_ids == a.tokenizer.eos_token_ids
        # The converted weights are the GGUF's dequantized values, bit for bit; the logits agree to
        # float32 rounding (BLAS and lmx's kernels may sum in another order).
        want = dict(tree_flatten(a_float.model.parameters()))
        got = dict(tree_flatten(b.model.parameters()))
        assert want.keys() == got.keys()
        for name, value in want.items():
            assert np.array_equal(np.array(value), np.array(got[name])), name
        # Three float32 pipelines (MLX's ops; lmx's kernels on the GGUF blocks; lmx's ops on the
        # converted floats) each lie within float32 noise of a float64 reference: transformers on the
        # converted directory. Measured (2026-12-05): up to 1.05e-4 from it (mean ~9e-6) for logits
        # of range ~20, so two of them may differ by twice that.
        import torch
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), torch_dtype=torch.float64).eval()
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].numpy()
        runs = {"float": _logits(a_float, ids), "kernels": _logits(a, ids), "converted": _logits(b, ids)}
        for name, logits in runs.items():
            np.testing.assert_allclose(logits, ref, rtol=0, atol=1.5e-4, err_msg=name)
            assert np.abs(logits - ref).mean() < 2e-5, name
        np.testing.assert_allclose(runs["float"], runs["converted"], rtol=0, atol=2e-4)
        np.testing.assert_allclose(runs["kernels"], runs["converted"], rtol=0, atol=2e-4)
        assert b.generate(ids, max_tokens=8).tokens == a.generate(ids, max_tokens=8).tokens


def test_quantized_convert_loads_and_generates(tiny_dirs, tmp_path):
    src = tiny_dirs["qwen3"]
    out = convert(src, tmp_path / "q8", q_bits=8, q_group_size=32)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 8}
    with lmx.load(src) as full, lmx.load(out) as quant:
        assert quant.info().quantization == {"group_size": 32, "bits": 8}
        assert quant.info().weights_bytes < full.info().weights_bytes
        ids = full.tokenizer.encode("Hello world! How are you")
        ref, got = _logits(full, ids), _logits(quant, ids)
        assert np.abs(got - ref).max() / np.abs(ref).max() < 0.05  # 8-bit affine: close, not equal
        result = quant.generate(ids, max_tokens=6)
        assert len(result.tokens) == 6


def test_convert_refuses_bad_options_and_existing_output(tiny_dirs, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(InvalidOptionError, match="already exists"):
        convert(tiny_dirs["gemma3"], tmp_path / "taken")
    with pytest.raises(InvalidOptionError, match="q_bits must be one of"):
        convert(tiny_dirs["gemma3"], tmp_path / "x", q_bits=3)
    with pytest.raises(InvalidOptionError, match="dtype must be one of"):
        convert(tiny_dirs["gemma3"], tmp_path / "x", dtype="int8")
    assert not (tmp_path / "x").exists()


def test_convert_cli_round_trip(tiny_dirs, tmp_path):
    out = tmp_path / "bf16"
    run = subprocess.run(
        [sys.executable, "-m", "lmx.cli.main", "convert", str(tiny_dirs["gemma3"]), str(out), "--dtype", "bfloat16"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(out)
    assert [p.name for p in tmp_path.iterdir()] == ["bf16"]  # no temp dir left behind
    with lmx.load(out) as engine:
        assert engine.info().dtype == "float32"  # auto on CPU loads float32 from bf16 storage
        assert len(engine.generate("Hello", max_tokens=3).tokens) == 3

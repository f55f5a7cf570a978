"""GGUF matrices held as MLX affine quantized layers (issue 17 part 3: "GGUF on the GPU runs quantized").

Where lmx's CPU kernels do not run a GGUF model (the GPU; the CPU with ``cpu_kernels=False``), the
profile's ``gguf_on_device="quantized"`` re-expresses Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K blocks in
``mx.quantize``'s layout, and re-quantizes Q6_K to 8 bits. MLX's quantized products run on the CPU
too, so these tests force that path on the CPU: the mapping's ``mx.dequantize`` must equal lmx's
exact dequantization bit for bit (float32 scales), Q6_K's within its stated bound, and a real model
must decode the same greedy tokens as the float path, in less memory.
"""

from __future__ import annotations

import lmx  # isort: skip  (loads OpenBLAS before mlx.core)

from collections.abc import Iterator
from pathlib import Path

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from mlx.utils import tree_flatten

from lmx.errors import InvalidOptionError, WeightsError
from lmx.io import gguf_quants
from lmx.io.gguf import read_header
from lmx.runtime.profile import choose_profile

pytest_plugins = ["conftest_gguf"]

AFFINE = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K]
GGUF_QUANTIZES = {T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1}  # gguf.quants.quantize has no K-quant quantizer


def _blocks(qtype: T, rows: int, cols: int, seed: int) -> np.ndarray:
    """A (rows, cols) matrix's bytes: gguf's own quantizer of random normals where it has one, else random blocks."""
    rng = np.random.default_rng(seed)
    if qtype in GGUF_QUANTIZES:
        values = rng.normal(0, 0.05, size=(rows, cols)).astype(np.float32)
        return gguf.quants.quantize(values, qtype).reshape(-1)
    from conftest_gguf import random_blocks

    return random_blocks(qtype, rows, cols, rng).reshape(-1)


def _affine_dequantized(raw: np.ndarray, qtype: int, shape: tuple[int, int], dtype: mx.Dtype) -> np.ndarray:
    weight, scales, biases = gguf_quants.to_affine(raw, qtype, shape)
    out = mx.dequantize(
        mx.array(weight),
        mx.array(scales).astype(dtype),
        mx.array(biases).astype(dtype),
        group_size=gguf_quants.AFFINE_GROUP_SIZE,
        bits=gguf_quants.AFFINE_BITS[qtype],
    )
    return np.array(out.astype(mx.float32))


@pytest.mark.parametrize("qtype", AFFINE, ids=lambda t: t.name)
def test_affine_form_dequantizes_to_the_exact_values(qtype):
    rows, cols = 48, 512
    raw = _blocks(qtype, rows, cols, seed=int(qtype))
    exact = gguf_quants.dequantize(raw, qtype, rows * cols).reshape(rows, cols)
    got = _affine_dequantized(raw, qtype, (rows, cols), mx.float32)
    assert np.array_equal(got, exact)  # bit for bit, float32 scales and biases
    assert np.array_equal(exact, gguf.quants.dequantize(raw.reshape(rows, -1), qtype))  # the reference agrees


@pytest.mark.parametrize("qtype", AFFINE, ids=lambda t: t.name)
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16], ids=["bfloat16", "float16"])
def test_scales_in_a_16_bit_dtype_stay_within_their_rounding(qtype, dtype):
    """Scales and biases in the model's 16-bit dtype: each value is off by at most the rounding of
    ``scale``, ``bias``, ``scale * u`` and the result (unit roundoff ``eps``)."""
    rows, cols = 32, 256
    raw = _blocks(qtype, rows, cols, seed=7 + int(qtype))
    exact = gguf_quants.dequantize(raw, qtype, rows * cols).reshape(rows, cols)
    weight, scales, biases = gguf_quants.to_affine(raw, qtype, (rows, cols))
    got = _affine_dequantized(raw, qtype, (rows, cols), dtype)
    eps = 2.0**-8 if dtype == mx.bfloat16 else 2.0**-11
    bias = np.repeat(biases, 32, axis=1)
    product = np.abs(exact - bias)  # |scale * u|
    bound = eps * (2 * product + 2 * np.abs(bias) + 2 * np.abs(exact)) * 1.01
    assert np.all(np.abs(got - exact) <= bound)
    assert scales.shape == (rows, cols // 32) and weight.dtype == np.uint32


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_packing_matches_mlx_quantize(bits):
    """``pack_bits`` lays integers out as ``mx.quantize`` does: quantizing the integers themselves (each
    group holding 0 and the largest value, so the scale is +-1) gives the words of those integers."""
    rng = np.random.default_rng(bits)
    top = 2**bits - 1
    u = rng.integers(0, top + 1, size=(8, 128), dtype=np.uint8)
    u[:, ::32], u[:, 1::32] = 0, top
    words, scales, biases = mx.quantize(mx.array(u.astype(np.float32)), group_size=32, bits=bits)
    s, b = np.repeat(np.array(scales), 32, axis=1), np.repeat(np.array(biases), 32, axis=1)
    assert np.all(np.abs(s) == 1)  # MLX picks +-1 and a bias of 0 or the largest value
    stored = ((u - b) / s).astype(np.uint8)  # the integers it stores: u, or top - u
    assert np.array_equal(gguf_quants.pack_bits(stored, bits), np.array(words))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_q6_k_requantized_stays_within_an_eighth_of_its_step(seed):
    """Q6_K in 8 bits per group of 32 (two sub-blocks of 16): the coarser sub-block's values exact,
    every value within d * max|sc| / 8 of the file's; a quarter step only where the two sub-blocks'
    quarter steps span all 257 levels (equal and opposite scales, each with a q of -32)."""
    rows, cols = 64, 512
    raw = _blocks(T.Q6_K, rows, cols, seed=seed)
    exact = gguf_quants.dequantize(raw, T.Q6_K, rows * cols).reshape(rows, cols)
    got = _affine_dequantized(raw, T.Q6_K, (rows, cols), mx.float32)
    # the block fields, read here from the format's layout: ql 128, qh 64, 16 int8 scales, fp16 d
    blocks = raw.reshape(-1, 210)
    d = np.abs(blocks[:, 208:210].view("<f2").astype(np.float64)).reshape(-1, 1, 1)
    sc = blocks[:, 192:208].view(np.int8).astype(np.float64).reshape(-1, 8, 2)
    ql, qh = blocks[:, :128].astype(np.int64), blocks[:, 128:192].astype(np.int64)
    q = np.empty((blocks.shape[0], 256), dtype=np.int64)
    for half in range(2):  # llama.cpp's dequantize_row_q6_K, element by element
        for lane in range(32):
            a, b, h = ql[:, 64 * half + lane], ql[:, 64 * half + lane + 32], qh[:, 32 * half + lane]
            q[:, 128 * half + lane] = (a & 15) | ((h & 3) << 4)
            q[:, 128 * half + lane + 32] = (b & 15) | (((h >> 2) & 3) << 4)
            q[:, 128 * half + lane + 64] = (a >> 4) | (((h >> 4) & 3) << 4)
            q[:, 128 * half + lane + 96] = (b >> 4) | (((h >> 6) & 3) << 4)
    q = (q - 32).reshape(-1, 8, 2, 16)
    big = np.abs(sc).max(axis=2, keepdims=True)  # (blocks, 8, 1)
    step = d * big
    spans_all = (sc[:, :, 0] == -sc[:, :, 1]) & (sc[:, :, 0] != 0) & (q.min(axis=3) == -32).all(axis=2)
    allowed = np.where(spans_all[..., None], step / 4, step / 8)
    err = np.abs(got - exact).reshape(-1, 8, 32)
    assert np.all(err <= allowed * (1 + 1e-6) + 1e-6 * np.abs(exact).reshape(-1, 8, 32))
    coarser = (np.abs(sc) == big)[..., None].repeat(16, axis=3).reshape(-1, 8, 32)
    coarser &= ~spans_all[..., None]  # there the top level is clipped
    assert np.all(err[coarser] <= 1e-6 * np.abs(exact).reshape(-1, 8, 32)[coarser])
    assert (err > 0).any()  # the finer sub-blocks do round: the form is not exact


def test_types_without_an_affine_form_are_refused():
    raw = _blocks(T.Q3_K, 4, 256, seed=1)
    with pytest.raises(WeightsError, match=r"Q3_K has no MLX affine form; types that do: Q8_0, Q4_0"):
        gguf_quants.to_affine(raw, T.Q3_K, (4, 256))
    with pytest.raises(WeightsError, match="needs 1088 bytes"):
        gguf_quants.to_affine(np.zeros(100, np.uint8), T.Q8_0, (4, 256))
    assert gguf_quants.affine_name(5) == "mlx affine q5 g32"
    assert gguf_quants.affine_name(8, T.Q6_K) == "mlx affine q8 g32, requantized"


def test_the_real_files_matrices_map_exactly(gemma_gguf):
    """One matrix of each affine type in the bundled Gemma 3 270M Q4_K_M file, bit for bit."""
    header = read_header(gemma_gguf)
    data = np.memmap(gemma_gguf, dtype=np.uint8, mode="r")
    seen = set()
    for info in header.tensors.values():
        if info.ggml_type not in gguf_quants.AFFINE_BITS or info.ggml_type in seen or info.shape[0] > 4096:
            continue
        if info.ggml_type in gguf_quants.AFFINE_INEXACT:  # Q6_K: its bound is checked above
            continue
        seen.add(info.ggml_type)
        raw = data[info.offset : info.offset + info.nbytes]
        exact = gguf_quants.dequantize(raw, info.ggml_type, info.n_elements).reshape(info.shape)
        assert np.array_equal(_affine_dequantized(raw, info.ggml_type, info.shape, mx.float32), exact), info.name
    assert seen == {T.Q8_0, T.Q5_0, T.Q4_K}


def test_profile_chooses_float_unless_quantized_is_asked(monkeypatch):
    assert choose_profile("gpu").gguf_on_device == "float"
    assert choose_profile("gpu", gguf_on_device="quantized").gguf_on_device == "quantized"
    assert choose_profile("cpu").gguf_on_device == "float"
    assert choose_profile("cpu", cpu_kernels=True).gguf_on_device == "blocks"
    assert choose_profile("gpu", gguf_on_device="float").gguf_on_device == "float"
    assert choose_profile("cpu", gguf_on_device="quantized").gguf_on_device == "quantized"
    with pytest.raises(InvalidOptionError, match="gguf_on_device must be one of quantized, float, got 'q4'"):
        choose_profile("gpu", gguf_on_device="q4")
    from lmx.loading.loader import load_profile

    monkeypatch.setenv("LMX_GGUF_ON_DEVICE", "quantized")
    assert load_profile("float32").gguf_on_device == "quantized"
    assert load_profile("float32", gguf_on_device="float").gguf_on_device == "float"  # the option wins
    monkeypatch.setenv("LMX_GGUF_ON_DEVICE", "half")
    with pytest.raises(InvalidOptionError, match="LMX_GGUF_ON_DEVICE must be `auto`, `quantized` or `float`"):
        load_profile("float32")


def test_tiny_gguf_of_every_type_gives_the_float_logits(tiny_gguf):
    """A tiny Qwen 3 file mixing Q4_0..Q5_K, Q6_K (re-quantized), Q2_K/Q3_K (dequantized), BF16 and
    F16, with an untied Q6_K head: the quantized load computes the float load's logits, up to Q6_K's
    re-quantization (each weight within an eighth of its step; measured 0.29% of the largest logit)."""
    arch = "qwen3"
    from lmx.loading import load_model

    prompt = mx.array([[1, 40, 41, 42, 43, 44, 45, 46]])
    quantized = load_model(tiny_gguf[arch], dtype="float32", cpu_kernels=False, gguf_on_device="quantized")
    floats = load_model(tiny_gguf[arch], dtype="float32", cpu_kernels=False, gguf_on_device="float")
    kinds = {type(m).__name__ for _, m in quantized.model.named_modules()}
    assert "QuantizedLinear" in kinds and "QuantizedEmbedding" in kinds
    assert set(quantized.gguf_affine.values()) == {T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K}
    assert quantized.gguf_affine["lm_head"] == T.Q6_K and quantized.model.lm_head.bits == 8
    a, b = np.array(quantized.model(prompt)), np.array(floats.model(prompt))
    assert np.abs(a - b).max() <= 1e-2 * np.abs(b).max()
    assert (a.argmax(-1) == b.argmax(-1)).all()


@pytest.fixture(scope="module")
def gemma_engines(gemma_gguf: Path) -> Iterator[dict[str, lmx.Engine]]:
    """The bundled Gemma 3 270M GGUF on the CPU without lmx's kernels, both ways, float32."""
    out = {
        mode: lmx.load(gemma_gguf, device="cpu", dtype="float32", cpu_kernels=False, gguf_on_device=mode)
        for mode in ("quantized", "float")
    }
    yield out
    for engine in out.values():
        engine.close()


def test_real_model_quantized_decodes_the_float_paths_tokens(gemma_engines):
    q, f = gemma_engines["quantized"], gemma_engines["float"]
    assert q.loaded.profile.gguf_on_device == "quantized" and f.loaded.profile.gguf_on_device == "float"
    embed = q.loaded.model.model.embed_tokens
    assert isinstance(embed, nn.QuantizedEmbedding) and embed.bits == 8  # Q8_0; the tied head is its as_linear
    prompt = "The capital of France is Paris. The capital of Germany is"
    a = q.generate(prompt, max_tokens=16, temperature=0.0)
    b = f.generate(prompt, max_tokens=16, temperature=0.0)
    assert a.tokens == b.tokens and len(a.tokens) == 16


def test_real_model_quantized_weights_take_at_most_40_percent(gemma_engines):
    qi, fi = gemma_engines["quantized"].info(), gemma_engines["float"].info()
    assert qi.weights_bytes <= 0.40 * fi.weights_bytes  # measured: 332 MB vs 1072 MB (31%)
    assert qi.num_parameters == fi.num_parameters  # values, not packed words
    assert qi.affine_types == {
        "Q5_0": {"runs_as": "mlx affine q5 g32", "matrices": 81},
        "Q4_K": {"runs_as": "mlx affine q4 g32", "matrices": 27},
        "Q8_0": {"runs_as": "mlx affine q8 g32", "matrices": 10},
        "Q6_K": {"runs_as": "mlx affine q8 g32, requantized", "matrices": 9},
    }
    assert "81 Q5_0 as mlx affine q5 g32" in qi.runs_as and fi.affine_types is None
    assert "dequantized from GGUF Q4_K_M" in fi.runs_as


def test_lora_trains_on_a_quantized_gguf(tiny_gguf):
    """LoRA (QLoRA) over the affine layers: the gradient reaches the adapters, the base stays frozen,
    and fusing re-quantizes the layer at its own bits."""
    from lmx.loading import load_model
    from lmx.train.lora import LoRALinear, apply_lora, fuse_lora

    loaded = load_model(tiny_gguf["qwen3"], dtype="float32", cpu_kernels=False, gguf_on_device="quantized")
    model = loaded.model
    apply_lora(model, rank=4, alpha=8.0, seed=0)
    adapted = [(p, m) for p, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert any(isinstance(m.base, nn.QuantizedLinear) and m.base.bits == 5 for _, m in adapted)
    prompt = mx.array([[1, 40, 41, 42, 43, 44, 45, 46]])

    def loss(m: nn.Module) -> mx.array:
        logits = m(prompt[:, :-1])
        return nn.losses.cross_entropy(logits, prompt[:, 1:]).mean()

    value, grads = nn.value_and_grad(model, loss)(model)
    assert np.isfinite(value.item())
    flat = dict(tree_flatten(grads))
    assert flat and all(k.endswith(("lora_a", "lora_b")) for k in flat)
    assert any(float(mx.abs(g).max()) > 0 for g in flat.values())
    assert fuse_lora(model) == len(adapted)
    bits = {m.bits for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)}
    assert bits == {4, 5, 8}  # q4 (Q4_0/Q4_1/Q4_K), q5 (Q5_0/Q5_1/Q5_K), q8 (Q8_0) kept


def test_ollama_tags_and_lmx_info_name_the_gguf_mix(gemma_engines, gemma_gguf):
    """Ollama's ``/api/tags`` over real HTTP says Q4_K_M, not FLOAT32; ``lmx info`` prints what runs."""
    import os
    import subprocess
    import sys

    import httpx

    from lmx.server import BackgroundServer, ServerSettings

    with BackgroundServer(ServerSettings(port=0, warm_up=False), gemma_engines["quantized"]) as server:
        tags = httpx.get(server.url + "/api/tags").json()["models"][0]["details"]
    assert tags["quantization_level"] == "Q4_K_M" and tags["format"] == "gguf"
    env = {**os.environ, "LMX_GGUF_ON_DEVICE": "quantized", "LMX_CPU_KERNELS": "0"}
    out = subprocess.run(
        [sys.executable, "-m", "lmx.cli.main", "info", "--model", str(gemma_gguf), "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert "GGUF matrices quantized" in out.stdout
    assert "runs:     GGUF Q4_K_M matrices as MLX quantized layers (81 Q5_0 as mlx affine q5 g32" in out.stdout


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q5_0, T.Q5_K], ids=lambda t: t.name)
def test_a_wider_packing_holds_the_same_values(qtype):
    """Where a device lacks a width's products, the loader packs the same integers in 8 bits."""
    raw = _blocks(qtype, 16, 256, seed=3)
    exact = gguf_quants.dequantize(raw, qtype, 16 * 256).reshape(16, 256)
    weight, scales, biases = gguf_quants.to_affine(raw, qtype, (16, 256), bits=8)
    assert weight.shape == (16, 64)
    got = mx.dequantize(mx.array(weight), mx.array(scales), mx.array(biases), group_size=32, bits=8)
    assert np.array_equal(np.array(got), exact)
    with pytest.raises(WeightsError, match=r"needs \d to 8 bits in MLX's affine form, got 3"):
        gguf_quants.to_affine(raw, qtype, (16, 256), bits=3)


def test_loading_with_8_bit_packing_gives_the_same_logits(tiny_gguf):
    """A GGUF read with every type packed in 8 bits (what a device without 4/5-bit products gets)."""
    from lmx.io.gguf import read_gguf
    from lmx.loading.loader import affine_widths_here
    from lmx.models import GGUF_ARCHITECTURES

    assert affine_widths_here(mx.float32) == gguf_quants.AFFINE_BITS  # MLX's CPU runs every width
    wide = read_gguf(tiny_gguf["qwen3"], GGUF_ARCHITECTURES, affine={t: 8 for t in gguf_quants.AFFINE_BITS})
    native = read_gguf(tiny_gguf["qwen3"], GGUF_ARCHITECTURES, affine=gguf_quants.AFFINE_BITS)
    assert set(wide.affine_bits.values()) == {8} and set(native.affine_bits.values()) == {4, 5, 8}
    for name, ggml_type in native.affine_types.items():
        path = name.removesuffix("weight")
        bits = native.affine_bits[name]
        a = mx.dequantize(
            native.weights[name], native.weights[path + "scales"], native.weights[path + "biases"], 32, bits
        )
        b = mx.dequantize(wide.weights[name], wide.weights[path + "scales"], wide.weights[path + "biases"], 32, 8)
        assert mx.array_equal(a, b).item(), (name, ggml_type)

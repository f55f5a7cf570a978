"""lmx's fused decode layer (lmx.kernels' decode_layer_begin/_end) against float64 numpy, the separate ops, and
the unfused model.

The expected values are float64 numpy from gguf-py's dequantized blocks and the definitions (RMSNorm, HF's
half-split RoPE, gelu_pytorch_tanh), never from the code under test. The fused ops claim more than closeness:
they run the separate kernel ops' own row loops and products, so their outputs must equal those ops' outputs
bit for bit, and a decode step built with them must give the unfused step's logits exactly.
"""

from __future__ import annotations

import collections
import re
import tempfile
import threading
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import lmx  # isort: skip  (loads OpenBLAS before mlx.core)
import mlx.core as mx

from conftest_gguf import random_blocks, write_tiny_gguf
from lmx.generate.step import eager_step
from lmx.kernels.build import supported_platform
from lmx.runtime.ops import CpuKernelOps, MlxOps
from test_cpu_layer_ops import np_rms_norm, np_rope

pytest_plugins = ["conftest_gguf"]

pytestmark = pytest.mark.skipif(supported_platform() is not None, reason=f"CPU kernels: {supported_platform()}")

EPS = 1e-6
DIM, HEADS, KV_HEADS, HEAD_DIM, HIDDEN = 256, 2, 1, 128, 512


@pytest.fixture(scope="module")
def K():
    from lmx.kernels import load_module

    module, reason = load_module()
    assert module is not None, reason
    return module


def weights(qtype: T, rows: int, cols: int, rng: np.random.Generator) -> tuple[mx.array, np.ndarray]:
    """Random blocks (as lmx holds them) and their float64 values (gguf-py's dequantize)."""
    blocks = random_blocks(qtype, rows, cols, rng)
    return mx.array(blocks), gguf.quants.dequantize(blocks, qtype).astype(np.float64)


def vector(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.normal(1.0, 0.1, size=n).astype(np.float32)


def close(got: mx.array, want: np.ndarray) -> None:
    err = np.abs(np.array(got, dtype=np.float64) - want).max() / np.abs(want).max()
    assert got.shape == want.shape and err < 1e-4, f"shape {got.shape} vs {want.shape}, error {err:.2e}"


def np_gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize(("rope_dims", "scale", "offset"), [(128, 1.0, 0), (64, 0.125, 37)])
def test_begin_is_the_float64_layer_and_the_separate_ops_bit_for_bit(K, rows, rope_dims, scale, offset):
    rng = np.random.default_rng(rows + offset)
    (wq, fq), (wk, fk), (wv, fv) = (
        weights(T.Q4_K, HEADS * HEAD_DIM, DIM, rng),
        weights(T.Q5_0, KV_HEADS * HEAD_DIM, DIM, rng),
        weights(T.Q8_0, KV_HEADS * HEAD_DIM, DIM, rng),
    )
    types = (T.Q4_K.value, T.Q5_0.value, T.Q8_0.value)
    norm, q_norm, k_norm = vector(DIM, rng), vector(HEAD_DIM, rng), vector(HEAD_DIM, rng)
    periods = (10_000.0 ** (np.arange(0, rope_dims, 2) / rope_dims)).astype(np.float32)
    x = rng.normal(size=(rows, 1, DIM)).astype(np.float32)
    m = {name: mx.array(a) for name, a in dict(x=x, norm=norm, q_norm=q_norm, k_norm=k_norm, periods=periods).items()}

    q, k, v = K.decode_layer_begin(
        m["x"], m["norm"], EPS, wq, wk, wv, types, HEADS, KV_HEADS, HEAD_DIM,
        m["q_norm"], m["k_norm"], EPS, rope_dims, m["periods"], scale, offset,
    )  # fmt: skip

    xn = np_rms_norm(x[:, 0], norm, EPS)  # (rows, DIM)

    def heads(w: np.ndarray, n: int, head_norm: np.ndarray | None) -> np.ndarray:
        h = (xn @ w.T).reshape(rows, n, 1, HEAD_DIM)
        return h if head_norm is None else np_rope(np_rms_norm(h, head_norm, EPS), rope_dims, periods, scale, offset)

    close(q, heads(fq, HEADS, q_norm))
    close(k, heads(fk, KV_HEADS, k_norm))
    close(v, heads(fv, KV_HEADS, None))

    xs = K.rms_norm(m["x"], m["norm"], EPS)

    def separate(w: mx.array, qtype: int, n: int, head_norm: mx.array | None) -> mx.array:
        h = K.qmatmul(xs, w, qtype, DIM).reshape(rows, n, 1, HEAD_DIM)
        return h if head_norm is None else K.rope(K.rms_norm(h, head_norm, EPS), rope_dims, m["periods"], scale, offset)

    assert mx.array_equal(q, separate(wq, types[0], HEADS, m["q_norm"])).item()
    assert mx.array_equal(k, separate(wk, types[1], KV_HEADS, m["k_norm"])).item()
    assert mx.array_equal(v, separate(wv, types[2], KV_HEADS, None)).item()


def test_begin_puts_each_row_at_its_own_position(K):
    """Rows of a left-padded batch (offset a (B,) int32 array): row b is rotated from positions[b], and its
    q, k, v are the one-offset op's for that row alone, bit for bit."""
    rng = np.random.default_rng(7)
    (wq, _), (wk, _), (wv, _) = (
        weights(t, n * HEAD_DIM, DIM, rng) for t, n in ((T.Q4_K, HEADS), (T.Q5_0, KV_HEADS), (T.Q8_0, KV_HEADS))
    )
    types = (T.Q4_K.value, T.Q5_0.value, T.Q8_0.value)
    norm, q_norm, k_norm = (mx.array(vector(n, rng)) for n in (DIM, HEAD_DIM, HEAD_DIM))
    periods = mx.array((10_000.0 ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM)).astype(np.float32))
    x = mx.array(rng.normal(size=(4, 1, DIM)).astype(np.float32))
    positions = [3, 0, 41, 7]

    def begin(rows: mx.array, offset: int | mx.array) -> tuple[mx.array, ...]:
        return K.decode_layer_begin(
            rows, norm, EPS, wq, wk, wv, types, HEADS, KV_HEADS, HEAD_DIM, q_norm, k_norm, EPS, HEAD_DIM, periods, 1.0,
            offset,
        )  # fmt: skip

    batched = begin(x, mx.array(positions, dtype=mx.int32))
    for b, position in enumerate(positions):
        alone = begin(x[b : b + 1], position)
        for got, want in zip(batched, alone, strict=True):
            assert mx.array_equal(got[b : b + 1], want).item(), f"row {b}"
    with pytest.raises(ValueError, match=r"positions must be int32 \(4,\), one a row of x, got \(3,\)"):
        begin(x, mx.array([1, 2, 3], dtype=mx.int32))


@pytest.mark.parametrize("rows", [1, 5])
def test_end_is_the_float64_layer_and_the_separate_ops_bit_for_bit(K, rows):
    rng = np.random.default_rng(10 + rows)
    (wo, fo), (wg, fg), (wu, fu), (wd, fd) = (
        weights(T.Q5_0, DIM, HEADS * HEAD_DIM, rng),
        weights(T.Q4_0, HIDDEN, DIM, rng),
        weights(T.Q8_0, HIDDEN, DIM, rng),
        weights(T.Q6_K, DIM, HIDDEN, rng),
    )
    types = [T.Q5_0.value, T.Q4_0.value, T.Q8_0.value, T.Q6_K.value]
    post_attn, pre_ffn, post_ffn = vector(DIM, rng), vector(DIM, rng), vector(DIM, rng)
    x = rng.normal(size=(rows, 1, DIM)).astype(np.float32)
    attn = rng.normal(size=(rows, HEADS, 1, HEAD_DIM)).astype(np.float32)
    m = {
        n: mx.array(a) for n, a in dict(x=x, attn=attn, post_attn=post_attn, pre_ffn=pre_ffn, post_ffn=post_ffn).items()
    }

    got = K.decode_layer_end(m["x"], m["attn"], wo, m["post_attn"], m["pre_ffn"], wg, wu, wd, m["post_ffn"], types, EPS)

    h = x[:, 0].astype(np.float64) + np_rms_norm(attn.reshape(rows, -1) @ fo.T, post_attn, EPS)
    hn = np_rms_norm(h, pre_ffn, EPS)
    want = h + np_rms_norm((np_gelu_tanh(hn @ fg.T) * (hn @ fu.T)) @ fd.T, post_ffn, EPS)
    close(got, want[:, None, :])

    o = K.qmatmul(m["attn"].reshape(rows, 1, -1), wo, types[0], HEADS * HEAD_DIM)
    hs = m["x"] + K.rms_norm(o, m["post_attn"], EPS)
    hns = K.rms_norm(hs, m["pre_ffn"], EPS)
    act = K.gelu_tanh_mul(K.qmatmul(hns, wg, types[1], DIM), K.qmatmul(hns, wu, types[2], DIM))
    separate = hs + K.rms_norm(K.qmatmul(act, wd, types[3], HIDDEN), m["post_ffn"], EPS)
    assert mx.array_equal(got, separate).item()


def test_bad_arguments_are_errors_that_name_them(K):
    rng = np.random.default_rng(0)
    wq, _ = weights(T.Q8_0, HEADS * HEAD_DIM, DIM, rng)
    wk, _ = weights(T.Q8_0, KV_HEADS * HEAD_DIM, DIM, rng)
    norm, head = mx.array(vector(DIM, rng)), mx.array(vector(HEAD_DIM, rng))
    periods = mx.ones((HEAD_DIM // 2,))
    q8 = T.Q8_0.value

    def begin(x: mx.array, wv: mx.array, types: tuple[int, int, int] = (q8, q8, q8)) -> None:
        K.decode_layer_begin(
            x, norm, EPS, wq, wk, wv, types, HEADS, KV_HEADS, HEAD_DIM, head, head, EPS, HEAD_DIM, periods, 1.0, 0
        )

    with pytest.raises(ValueError, match=r"1 <= B <= 8, got \(9,1,256,\)"):
        begin(mx.zeros((9, 1, DIM)), wk)
    with pytest.raises(ValueError, match=r"x must be float32 \(B, 1, 256\)"):
        begin(mx.zeros((1, 2, DIM)), wk)
    with pytest.raises(ValueError, match=r"wv must be uint8 \(128, 272\), got \(256,272,\)"):
        begin(mx.zeros((1, 1, DIM)), wq)
    with pytest.raises(ValueError, match="wk: GGML type 3 cannot hold rows"):
        begin(mx.zeros((1, 1, DIM)), wk, (q8, 3, q8))
    with pytest.raises(ValueError, match="types must hold"):
        K.decode_layer_end(
            mx.zeros((1, 1, DIM)), mx.zeros((1, HEADS, 1, HEAD_DIM)), wq, norm, norm, wq, wq, wq, norm, [q8], EPS
        )


def op_counts(logits: mx.array) -> collections.Counter:
    with tempfile.NamedTemporaryFile(suffix=".dot") as f:
        mx.export_to_dot(f.name, logits)
        return collections.Counter(re.findall(r'label ?= ?"([A-Za-z_]+)', Path(f.name).read_text()))


@pytest.mark.slow
@pytest.mark.parametrize("rows", [1, 2])
def test_real_gemma_step_equals_the_unfused_step_exactly(gemma_gguf: Path, rows: int):
    """The bundled Gemma 3 270M: each layer's two fused ops in a decode step, and the step's logits are the unfused
    step's (built outside the ops' inference()) bit for bit, for several steps of one row and of a batch."""
    model = lmx.load(gemma_gguf, device="cpu", cpu_kernels=True).loaded.model
    assert isinstance(model.ops, CpuKernelOps)
    prompt = mx.array([[2, *range(100 + 40 * r, 140 + 40 * r)] for r in range(rows)])
    fused_cache, plain_cache = model.make_cache(), model.make_cache()
    mx.eval(model(prompt, fused_cache), model(prompt, plain_cache))
    tokens = mx.array([200 + r for r in range(rows)])
    for step in range(3):
        fused = eager_step(model, tokens, fused_cache, None)
        plain = model.head(model.hidden(tokens[:, None], plain_cache))[:, -1, :]
        if step == 0:
            ops, plain_ops = op_counts(fused), op_counts(plain)
            layers = model.args.num_hidden_layers
            assert ops["LmxDecodeLayerBegin"] == ops["LmxDecodeLayerEnd"] == layers, ops
            assert ops["LmxRmsNorm"] == 1 and ops["LmxQMatmul"] == 1  # the final norm, the head
            assert "LmxDecodeLayerBegin" not in plain_ops and plain_ops["LmxQMatmul"] == 7 * layers + 1
        assert fused.shape == (rows, model.args.vocab_size)
        assert mx.array_equal(fused, plain).item(), f"step {step}: max diff {mx.abs(fused - plain).max().item()}"
        tokens = mx.argmax(plain, axis=-1)


@pytest.mark.slow
@pytest.mark.parametrize("kv_bits", [None, 8, 4])
def test_real_gemma_padded_rows_step_as_each_row_alone_exactly(gemma_gguf: Path, kv_bits: int | None):
    """The bundled Gemma 3 270M: rows of different lengths left-padded into one batch (as the scheduler joins
    requests) decode with each layer's two fused ops and one attention op from each row's first key, and each
    row's logits are exactly those it gets decoding alone, step after step; with a quantized KV cache too. MLX's
    masked attention (a product, a select and a softmax a layer; for a quantized cache after dequantizing it
    whole) gave them within 5e-5, not exactly."""
    from lmx.models import batch_cache
    from lmx.models.cache import kv_quant

    model = lmx.load(gemma_gguf, device="cpu", cpu_kernels=True).loaded.model
    quant = kv_quant(kv_bits, 64, model.args.head_dim) if kv_bits else None
    prompts = [[2, *range(100, 140)], [2, *range(300, 310)], [2, *range(500, 530)]]
    batch, starts, alone = None, [0], []
    for prompt in prompts:
        own, joined = model.make_cache(quant), model.make_cache(quant)
        mx.eval(model(mx.array([prompt]), own), model(mx.array([prompt]), joined))
        alone.append(own)
        if batch is None:
            batch = joined
        else:
            before, new = batch_cache.merge(batch, starts, joined, [0])
            starts = before + new
    assert starts == [0, 30, 10]  # left padding: the longest prompt sets the batch's length
    pad = mx.array(starts, dtype=mx.int32)
    tokens = mx.array([200, 201, 202])
    for step in range(3):
        logits = eager_step(model, tokens, batch, pad)
        if step == 0:
            ops = op_counts(logits)
            layers = model.args.num_hidden_layers
            attention = "LmxQuantizedAttention" if kv_bits else "LmxAttention"
            assert ops["LmxDecodeLayerBegin"] == ops[attention] == ops["LmxDecodeLayerEnd"] == layers, ops
            assert not ops["Matmul"] and not ops["Softmax"] and not ops["Cos"] and not ops["Dequantize"], ops
        for row in range(len(prompts)):
            own = eager_step(model, tokens[row : row + 1], alone[row], None)
            assert mx.array_equal(logits[row : row + 1], own).item(), f"step {step}, row {row}"
        tokens = mx.argmax(logits, axis=-1)


@pytest.fixture(scope="module")
def qwen3_blocks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen 3 whose q, k and v weights are all blocks the kernels read (its MLP is not Gemma's: unfused)."""
    path = tmp_path_factory.mktemp("qwen3-blocks") / "tiny.gguf"
    kinds = [T.Q4_K, T.Q5_0, T.Q8_0, T.Q4_0]
    return write_tiny_gguf(path, "qwen3", rng=np.random.default_rng(3), kinds=kinds, v_type=T.Q6_K)


def test_qwen3_step_fuses_the_attention_inputs_exactly(qwen3_blocks: Path):
    engine = lmx.load(qwen3_blocks, device="cpu", cpu_kernels=True)
    model = engine.loaded.model
    prompt = mx.array([[5, 17, 29, 41, 53, 65, 77]])
    fused_cache, plain_cache = model.make_cache(), model.make_cache()
    mx.eval(model(prompt, fused_cache), model(prompt, plain_cache))
    token = mx.array([99])
    fused = eager_step(model, token, fused_cache, None)
    plain = model.head(model.hidden(token[:, None], plain_cache))[:, -1, :]
    ops = op_counts(fused)
    assert ops["LmxDecodeLayerBegin"] == model.args.num_hidden_layers and "LmxDecodeLayerEnd" not in ops, ops
    assert mx.array_equal(fused, plain).item()
    # generation runs the fused step and gives the unfused float32 model's greedy tokens
    reference = lmx.load(qwen3_blocks, device="cpu", cpu_kernels=False)
    assert (
        engine.generate("hello", max_tokens=6, temperature=0).tokens
        == reference.generate("hello", max_tokens=6, temperature=0).tokens
    )


def test_the_fused_ops_are_offered_only_inside_inference_and_per_thread(K):
    ops = CpuKernelOps(K)
    assert ops.decode_layer_kernels() is None
    seen = []
    with ops.inference():
        with ops.inference():
            assert ops.decode_layer_kernels() is K
        assert ops.decode_layer_kernels() is K  # still inside the outer one
        other = threading.Thread(target=lambda: seen.append(ops.decode_layer_kernels()))
        other.start()
        other.join()
    assert seen == [None]  # another thread's graphs may be differentiated
    assert ops.decode_layer_kernels() is None
    with MlxOps().inference():
        assert MlxOps().decode_layer_kernels() is None

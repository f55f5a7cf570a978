"""lmx's CPU layer ops (lmx.kernels: rms_norm, rope, attention) against float64 numpy and MLX.

The expected values are float64 numpy written here from the definitions (RMSNorm, rotary
embedding with HF's half-split layout, softmax attention), never from the code under test; the
gradients are MLX's own ops' gradients. Models loaded on the CPU kernels must use these ops.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import lmx  # isort: skip  (loads OpenBLAS before mlx.core)
import mlx.core as mx

from lmx.kernels.build import supported_platform
from lmx.runtime.ops import CpuKernelOps

pytest_plugins = ["conftest_gguf"]

needs_kernels = pytest.mark.skipif(supported_platform() is not None, reason=f"CPU kernels: {supported_platform()}")


@pytest.fixture(scope="module")
def K():
    from lmx.kernels import load_module

    module, reason = load_module()
    assert module is not None, reason
    return module


def np_rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def np_rope(x: np.ndarray, dims: int, periods: np.ndarray, scale: float, offset: int) -> np.ndarray:
    x = x.astype(np.float64)
    half = dims // 2
    pos = scale * (offset + np.arange(x.shape[-2], dtype=np.float64))
    theta = pos[:, None] / periods.astype(np.float64)[None, :]  # (L, half)
    c, s = np.cos(theta), np.sin(theta)
    a, b = x[..., :half], x[..., half:dims]
    return np.concatenate([a * c - b * s, a * s + b * c, x[..., dims:]], axis=-1)


def np_attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, causal: bool, mask: np.ndarray | None = None
) -> np.ndarray:
    """float64 softmax attention; ``mask`` (B or 1, 1, Lq, Lk) says which keys each query sees."""
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, groups, axis=1), np.repeat(v, groups, axis=1)
    scores = q @ k.swapaxes(-1, -2) * scale  # (B, H, Lq, Lk)
    if causal:
        lq, lk = scores.shape[-2:]
        scores = np.where(np.arange(lk)[None] <= (lk - lq + np.arange(lq))[:, None], scores, -np.inf)
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def close(got: mx.array, want: np.ndarray, tol: float) -> None:
    got = np.array(got).astype(np.float64)
    assert got.shape == want.shape
    err = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))
    assert err < tol, f"relative error {err:.2e} >= {tol:.0e}"


@needs_kernels
@pytest.mark.parametrize("shape", [(1, 1, 640), (2, 4, 3, 256), (5, 32)])
def test_rms_norm(K, shape):
    rng = np.random.default_rng(len(shape))
    x, w = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape[-1]).astype(np.float32)
    got = K.rms_norm(mx.array(x), mx.array(w), 1e-6)
    close(got, np_rms_norm(x, w, 1e-6), 1e-6)
    # bit for bit what MLX's own op gives (the model's float32 path)
    np.testing.assert_array_equal(np.array(got), np.array(mx.fast.rms_norm(mx.array(x), mx.array(w), 1e-6)))


@needs_kernels
def test_rms_norm_of_a_strided_view_and_other_dtypes(K):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 4, 64)).astype(np.float32)
    w = rng.standard_normal(64).astype(np.float32)
    view = mx.array(x).transpose(0, 2, 1, 3)  # not row-contiguous
    close(K.rms_norm(view, mx.array(w), 1e-5), np_rms_norm(x.transpose(0, 2, 1, 3), w, 1e-5), 1e-6)
    xb, wb = mx.array(x).astype(mx.bfloat16), mx.array(w).astype(mx.bfloat16)
    got = K.rms_norm(xb, wb, 1e-5)  # not float32: MLX's op
    assert got.dtype == mx.bfloat16
    np.testing.assert_array_equal(
        np.array(got.astype(mx.float32)), np.array(mx.fast.rms_norm(xb, wb, 1e-5).astype(mx.float32))
    )


@needs_kernels
@pytest.mark.parametrize("offset", [0, 7, 1000])
@pytest.mark.parametrize(("dims", "scale"), [(256, 1.0), (64, 1.0), (128, 0.125)])
def test_rope(K, offset, dims, scale):
    rng = np.random.default_rng(offset + dims)
    x = rng.standard_normal((2, 4, 3, 128 if dims <= 128 else 256)).astype(np.float32)
    periods = (10000.0 ** (np.arange(0, dims, 2, dtype=np.float32) / dims)).astype(np.float32)
    got = K.rope(mx.array(x), dims, mx.array(periods), scale, offset)
    # float32 angles: the error grows with the position (as in every float32 RoPE)
    close(got, np_rope(x, dims, periods, scale, offset), 2e-6 * max(1, offset))
    want_mlx = mx.fast.rope(
        mx.array(x), dims, traditional=False, base=None, scale=scale, offset=offset, freqs=mx.array(periods)
    )
    close(got, np.array(want_mlx).astype(np.float64), 2e-6)


@needs_kernels
def test_rope_of_a_strided_view(K):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 5, 2, 64)).astype(np.float32)  # (B, L, H, D) -> (B, H, L, D) view
    periods = (500.0 ** (np.arange(0, 64, 2, dtype=np.float32) / 64)).astype(np.float32)
    got = K.rope(mx.array(x).transpose(0, 2, 1, 3), 64, mx.array(periods), 1.0, 3)
    close(got, np_rope(x.transpose(0, 2, 1, 3), 64, periods, 1.0, 3), 1e-5)


@needs_kernels
def test_rope_rows_puts_each_batch_row_at_its_own_position(K):
    """Rows of a left-padded batch: row b's positions start at offsets[b] (float64 reference), and each
    row's values are the one-offset op's for that row alone, bit for bit."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, 3, 2, 128)).astype(np.float32)  # (B, H, L, D)
    periods = (10000.0 ** (np.arange(0, 96, 2, dtype=np.float32) / 96)).astype(np.float32)
    offsets = [0, 5, 1, 300]
    got = np.array(K.rope_rows(mx.array(x), 96, mx.array(periods), 1.0, mx.array(offsets, dtype=mx.int32)))
    for b, offset in enumerate(offsets):
        close(mx.array(got[b]), np_rope(x[b], 96, periods, 1.0, offset), 2e-6 * max(1, offset))
        alone = K.rope(mx.array(x[b : b + 1]), 96, mx.array(periods), 1.0, offset)
        np.testing.assert_array_equal(got[b : b + 1], np.array(alone))
    with pytest.raises(ValueError):  # mx.fast.rope's own check: offsets for another batch size
        mx.eval(K.rope_rows(mx.array(x), 96, mx.array(periods), 1.0, mx.array([1, 2], dtype=mx.int32)))


@needs_kernels
@pytest.mark.parametrize(("kv_heads", "lk", "d"), [(1, 37, 256), (2, 300, 64), (4, 6, 12)])
def test_attention_from_each_row_s_first_key(K, kv_heads, lk, d):
    """One query a row over the keys from first[b] on (a left-padded batch): the float64 attention with
    that mask, and bit for bit what the row gets from the unpadded op over its own keys alone."""
    rng = np.random.default_rng(lk)
    batch, heads = 5, 2 * kv_heads
    q = rng.standard_normal((batch, heads, 1, d)).astype(np.float32)
    k = rng.standard_normal((batch, kv_heads, lk, d)).astype(np.float32)
    v = rng.standard_normal((batch, kv_heads, lk, d)).astype(np.float32)
    first = np.array([0, 1, 3, lk - 5, lk - 1], dtype=np.int32)
    got = np.array(K.attention_from(mx.array(q), mx.array(k), mx.array(v), 0.125, mx.array(first)))
    mask = (np.arange(lk)[None] >= first[:, None])[:, None, None]  # (B, 1, 1, Lk)
    close(mx.array(got), np_attention(q, k, v, 0.125, False, mask), 1e-5)
    for b in range(batch):
        own = slice(int(first[b]), lk)
        alone = K.attention(
            mx.array(q[b : b + 1]), mx.array(k[b : b + 1, :, own]), mx.array(v[b : b + 1, :, own]), 0.125, False
        )
        np.testing.assert_array_equal(got[b : b + 1], np.array(alone))
    # not float32: MLX's attention with the equivalent mask
    bf = [mx.array(a).astype(mx.bfloat16) for a in (q, k, v)]
    other = K.attention_from(*bf, 0.125, mx.array(first))
    assert other.dtype == mx.bfloat16
    want = mx.fast.scaled_dot_product_attention(*bf, scale=0.125, mask=mx.array(mask))
    np.testing.assert_array_equal(np.array(other.astype(mx.float32)), np.array(want.astype(mx.float32)))


@needs_kernels
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "lq", "lk", "d"),
    [
        (1, 4, 1, 1, 200, 256),
        (2, 8, 2, 3, 17, 64),
        (1, 16, 8, 8, 8, 128),
        (3, 2, 2, 1, 1, 32),
        (2, 4, 1, 2, 11, 12),  # keys in fours and a remainder; a head dim with a tail past 8 lanes
        # a prompt (more than 8 queries): blocked BLAS products in blocks of 64 rows (a partial last
        # one), a chunk after cached keys (Lk > Lq), grouped-query heads
        (1, 2, 2, 20, 20, 32),
        (1, 4, 1, 512, 512, 256),
        (2, 8, 2, 130, 300, 64),
        (1, 4, 1, 9, 700, 256),
    ],
)
def test_attention(K, causal, batch, heads, kv_heads, lq, lk, d):
    rng = np.random.default_rng(lq * 100 + lk)
    q = rng.standard_normal((batch, heads, lq, d)).astype(np.float32)
    k = rng.standard_normal((batch, kv_heads, lk, d)).astype(np.float32)
    v = rng.standard_normal((batch, kv_heads, lk, d)).astype(np.float32)
    got = K.attention(mx.array(q), mx.array(k), mx.array(v), d**-0.5, causal)
    close(got, np_attention(q, k, v, d**-0.5, causal), 1e-5)


@needs_kernels
def test_decode_attention_on_threads_equals_one_thread(K):
    """Few queries over many keys: the query rows are shared out over the pool, each computed whole by one
    thread, so the result is the one-thread result bit for bit (and the float64 attention)."""
    rng = np.random.default_rng(5)
    q = mx.array(rng.standard_normal((2, 8, 3, 128)).astype(np.float32))
    k = mx.array(rng.standard_normal((2, 2, 600, 128)).astype(np.float32))
    v = mx.array(rng.standard_normal((2, 2, 600, 128)).astype(np.float32))
    before = K.num_threads()
    try:
        K.set_num_threads(1)
        one = np.array(K.attention(q, k, v, 0.1, True))
        K.set_num_threads(3)
        three = np.array(K.attention(q, k, v, 0.1, True))
    finally:
        K.set_num_threads(before)
    np.testing.assert_array_equal(one, three)
    close(mx.array(three), np_attention(np.array(q), np.array(k), np.array(v), 0.1, True), 1e-5)


@needs_kernels
def test_attention_over_cache_slices(K):
    """Keys and values as a KV cache hands them: a prefix of a larger buffer (a strided view)."""
    rng = np.random.default_rng(4)
    k_buf = rng.standard_normal((1, 2, 300, 64)).astype(np.float32)
    v_buf = rng.standard_normal((1, 2, 300, 64)).astype(np.float32)
    q = rng.standard_normal((1, 4, 2, 64)).astype(np.float32)
    got = K.attention(mx.array(q), mx.array(k_buf)[:, :, :120], mx.array(v_buf)[:, :, :120], 0.125, True)
    close(got, np_attention(q, k_buf[:, :, :120], v_buf[:, :, :120], 0.125, True), 1e-5)


@needs_kernels
@pytest.mark.parametrize("padded", [False, True])
def test_attention_of_many_queries_with_a_mask(K, padded):
    """A prompt chunk past a sliding window (the (1, 1, Lq, Lk) mask a rotating cache makes), and left-padded
    prompts prefilled together ((B, 1, Lq, Lk)): the masked BLAS path, against float64 and against MLX."""
    from lmx.models.cache import build_mask

    rng = np.random.default_rng(12)
    lq, lk, window = 128, 300, 200
    batch = 3 if padded else 1
    pad = mx.array([0, 40, 170], dtype=mx.int32) if padded else None
    mask = build_mask(lq, lk, 700, window, pad)  # the last 128 of 700 positions over the last 300 keys
    assert mask.shape == (batch if padded else 1, 1, lq, lk)
    q = rng.standard_normal((batch, 4, lq, 64)).astype(np.float32)
    k = rng.standard_normal((batch, 1, lk, 64)).astype(np.float32)
    v = rng.standard_normal((batch, 1, lk, 64)).astype(np.float32)
    got = K.attention_masked(mx.array(q), mx.array(k), mx.array(v), 0.125, mask)
    close(got, np_attention(q, k, v, 0.125, False, np.array(mask)), 1e-5)
    mlx_out = mx.fast.scaled_dot_product_attention(mx.array(q), mx.array(k), mx.array(v), scale=0.125, mask=mask)
    close(got, np.array(mlx_out).astype(np.float64), 1e-5)
    ops = CpuKernelOps(K)  # the model's seam sends such a mask here
    seam = ops.attention(mx.array(q), mx.array(k), mx.array(v), 0.125, mask)
    np.testing.assert_array_equal(np.array(seam), np.array(got))


@needs_kernels
def test_attention_of_many_queries_over_cache_slices_and_strided_queries(K):
    rng = np.random.default_rng(11)
    k_buf = rng.standard_normal((1, 2, 400, 64)).astype(np.float32)
    v_buf = rng.standard_normal((1, 2, 400, 64)).astype(np.float32)
    q_wide = rng.standard_normal((1, 8, 100, 64)).astype(np.float32)
    q = mx.array(q_wide)[:, ::2]  # every other head: a strided view
    got = K.attention(q, mx.array(k_buf)[:, :, :250], mx.array(v_buf)[:, :, :250], 0.125, True)
    close(got, np_attention(q_wide[:, ::2], k_buf[:, :, :250], v_buf[:, :, :250], 0.125, True), 1e-5)
    q_t = mx.array(rng.standard_normal((1, 100, 4, 64)).astype(np.float32)).transpose(0, 2, 1, 3)  # rows strided
    close(
        K.attention(q_t, mx.array(k_buf)[:, :, :100], mx.array(v_buf)[:, :, :100], 0.125, True),
        np_attention(np.array(q_t), k_buf[:, :, :100], v_buf[:, :, :100], 0.125, True),
        1e-5,
    )


@needs_kernels
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_logsumexp(K, scale):
    rng = np.random.default_rng(int(scale))
    x = (rng.standard_normal((3, 262147)) * scale).astype(np.float32)  # a vocabulary-sized row, odd length
    xd = x.astype(np.float64)
    top = xd.max(-1, keepdims=True)
    got = K.logsumexp(mx.array(x))
    assert got.shape == (3, 1)
    close(got, top + np.log(np.exp(xd - top).sum(-1, keepdims=True)), 1e-6)
    # every exponent of the float32 range that matters: pairs (a, 0) give log(1 + e^a)
    a = np.linspace(-90, 0, 200001, dtype=np.float32)
    pairs = K.logsumexp(mx.array(np.stack([a, np.zeros_like(a)], -1)))
    assert float(np.abs(np.array(pairs)[:, 0] - np.log1p(np.exp(a.astype(np.float64)))).max()) < 2e-7


@needs_kernels
def test_logsumexp_special_values_and_other_dtypes(K):
    inf, nan = np.inf, np.nan
    rows = {(-inf, -inf): -inf, (inf, 1.0): inf, (-inf, 2.0): 2.0, (3.0,): 3.0}
    for row, want in rows.items():
        assert np.array(K.logsumexp(mx.array(np.array([row], np.float32))))[0, 0] == want, row
    assert np.isnan(np.array(K.logsumexp(mx.array(np.array([[1.0] * 7 + [nan] + [1.0] * 9], np.float32))))[0, 0])
    xb = mx.array(np.linspace(-3, 3, 40, dtype=np.float32)).astype(mx.bfloat16)[None]
    got = K.logsumexp(xb)  # not float32: MLX's op
    assert got.dtype == mx.bfloat16
    np.testing.assert_array_equal(
        np.array(got.astype(mx.float32)), np.array(mx.logsumexp(xb, -1, keepdims=True).astype(mx.float32))
    )


@needs_kernels
def test_gradients_are_mlx_ops_gradients(K):
    rng = np.random.default_rng(6)
    x = mx.array(rng.standard_normal((1, 4, 2, 64)).astype(np.float32))
    w = mx.array(rng.standard_normal(64).astype(np.float32))
    k = mx.array(rng.standard_normal((1, 2, 9, 64)).astype(np.float32))
    periods = mx.array((10000.0 ** (np.arange(0, 64, 2, dtype=np.float32) / 64)).astype(np.float32))

    def ours(x, w):
        h = K.rope(K.rms_norm(x, w, 1e-6), 64, periods, 1.0, 5)
        return (K.attention(h, k, k, 0.125, True) ** 2).sum() + K.logsumexp(h).sum()

    def mlx_ops(x, w):
        h = mx.fast.rope(
            mx.fast.rms_norm(x, w, 1e-6), 64, traditional=False, base=None, scale=1.0, offset=5, freqs=periods
        )
        attended = mx.fast.scaled_dot_product_attention(h, k, k, scale=0.125, mask="causal")
        return (attended**2).sum() + mx.logsumexp(h, axis=-1, keepdims=True).sum()

    got = mx.grad(ours, argnums=(0, 1))(x, w)
    want = mx.grad(mlx_ops, argnums=(0, 1))(x, w)
    for g, e in zip(got, want):
        close(g, np.array(e).astype(np.float64), 1e-5)


@needs_kernels
def test_models_on_the_kernels_use_the_layer_ops(tiny_gguf: dict[str, Path]):
    fast = lmx.load(tiny_gguf["qwen3"], device="cpu", cpu_kernels=True).loaded
    plain = lmx.load(tiny_gguf["qwen3"], device="cpu", cpu_kernels=False).loaded
    assert (fast.profile.ops_backend, plain.profile.ops_backend) == ("cpu-kernels", "mlx")
    assert isinstance(fast.model.ops, CpuKernelOps)  # the model: generate_step's logsumexp
    assert not isinstance(plain.model.ops, CpuKernelOps)
    layer, plain_layer = fast.model.layers[0], plain.model.layers[0]
    for module in (layer.self_attn, layer.self_attn.rope, layer.self_attn.q_norm, layer.input_layernorm):
        assert isinstance(module.ops_slot.ops, CpuKernelOps), type(module).__name__
    for module in (plain_layer.self_attn, plain_layer.self_attn.rope, plain_layer.input_layernorm):
        assert not isinstance(module.ops_slot.ops, CpuKernelOps), type(module).__name__


def np_gelu_tanh_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """gelu_pytorch_tanh(gate) * up in float64, as x * sigmoid(2 inner) (= 0.5 x (1 + tanh(inner))
    without the cancellation of 1 + tanh for negative x)."""
    x = gate.astype(np.float64)
    inner = np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)
    with np.errstate(over="ignore"):
        return x / (1.0 + np.exp(-2.0 * inner)) * up.astype(np.float64)


@needs_kernels
@pytest.mark.parametrize("shape", [(1, 1, 2048), (1, 512, 2048), (3, 7, 1000)])
def test_gelu_tanh_mul(K, shape):
    rng = np.random.default_rng(7)
    gate = (3 * rng.standard_normal(shape)).astype(np.float32)
    up = rng.standard_normal(shape).astype(np.float32)
    got = np.array(K.gelu_tanh_mul(mx.array(gate), mx.array(up))).astype(np.float64)
    want = np_gelu_tanh_mul(gate, up)
    # float32's rounding of the inner polynomial moves exp by |2 inner| ulps: at most ~2e-5 relative for |x| < 10
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-30)
    import torch  # an independent implementation (torch's tanh form, float32)

    ref = torch.nn.functional.gelu(torch.from_numpy(gate), approximate="tanh") * torch.from_numpy(up)
    np.testing.assert_allclose(got, ref.double().numpy(), rtol=0, atol=2e-6 * np.abs(up).max())


@needs_kernels
def test_gelu_tanh_mul_special_values_strides_and_other_dtypes(K):
    x = mx.array([0.0, -0.0, 1e-20, -1e-20, 5.0, -5.0, 30.0, -30.0, 100.0, -100.0, np.inf, np.nan])
    got = np.array(K.gelu_tanh_mul(x, mx.ones_like(x)))
    np.testing.assert_allclose(got[:10], np_gelu_tanh_mul(np.array(x)[:10], np.ones(10)), rtol=2e-5, atol=1e-30)
    assert got[10] == np.inf and np.isnan(got[11])
    base = mx.array(np.random.default_rng(8).standard_normal((6, 8)).astype(np.float32))
    strided = base[:, ::2]  # a view: gathered first
    close(K.gelu_tanh_mul(strided, strided), np_gelu_tanh_mul(np.array(strided), np.array(strided)), 2e-5)
    half = base.astype(mx.bfloat16)  # not float32: MLX's own ops
    want = np_gelu_tanh_mul(np.array(half.astype(mx.float32)), np.array(half.astype(mx.float32)))
    assert K.gelu_tanh_mul(half, half).dtype == mx.bfloat16
    close(K.gelu_tanh_mul(half, half).astype(mx.float32), want, 2e-2)


@needs_kernels
def test_gelu_tanh_mul_gradient_is_mlx_ops_gradient(K):
    import mlx.nn as nn

    rng = np.random.default_rng(9)
    gate = mx.array((2 * rng.standard_normal((4, 64))).astype(np.float32))
    up = mx.array(rng.standard_normal((4, 64)).astype(np.float32))
    got = mx.grad(lambda g, u: (K.gelu_tanh_mul(g, u) ** 2).sum(), argnums=(0, 1))(gate, up)
    want = mx.grad(lambda g, u: ((nn.gelu_approx(g) * u) ** 2).sum(), argnums=(0, 1))(gate, up)
    for g, e in zip(got, want):
        close(g, np.array(e).astype(np.float64), 1e-5)


def np_nucleus_bounds(x: np.ndarray, threshold: float) -> tuple[float, float | None]:
    """float64 probability mass of the tokens above ``threshold``, and of those at or above it
    (``None`` when nothing lies below it)."""
    x = x.astype(np.float64)
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    above = probs[x > threshold].sum()
    return above, (probs[x >= threshold].sum() if np.any(x < threshold) else None)


@needs_kernels
@pytest.mark.parametrize("vocab", [7, 5000, 262144])
@pytest.mark.parametrize("spread", [0.1, 1.0, 4.0, 30.0])
@pytest.mark.parametrize("p", [1e-9, 0.5, 0.9, 0.999])
def test_top_p_is_the_float64_nucleus(K, vocab, spread, p):
    """Every row keeps exactly the tokens at or above one of its values t, where the float64 mass
    above t is below p and the mass from t up reaches it (the rule, with the float32 rounding of the
    masses as the only slack); rows with ties and -inf entries included."""
    rng = np.random.default_rng(vocab + int(spread * 10) + int(p * 1000))
    x = (rng.standard_normal((3, vocab)) * spread).astype(np.float32)
    x[1] = np.round(x[1])  # ties
    x[2, rng.integers(0, vocab, vocab // 2)] = -np.inf  # what top_k leaves
    reach = p - 1e-6
    got = np.array(K.top_p(mx.array(x), reach))
    for row, out in zip(x, got):
        kept = np.isfinite(out)
        t = row[kept].min()
        np.testing.assert_array_equal(out, np.where(row >= t, row, -np.inf).astype(np.float32))
        above, through = np_nucleus_bounds(row, t)
        assert above < reach + 1e-6 or t == row.max(), (above, reach)
        assert through is None or through >= reach - 1e-6, (through, reach)


@needs_kernels
def test_top_p_special_rows_and_other_dtypes(K):
    inf, nan = np.inf, np.nan
    for row in ([-inf] * 5, [1.0, nan, 2.0], [inf, 1.0, 2.0]):  # left as they are (MLX's rule keeps them too)
        got = np.array(K.top_p(mx.array(np.array([row], np.float32)), 0.5))
        np.testing.assert_array_equal(got, np.array([row], np.float32))
    lp = mx.array(np.log(np.array([[0.5, 0.3, 0.2]])), dtype=mx.float16)  # not float32: the ops use MLX's sort
    ops = CpuKernelOps(K)
    assert np.isfinite(np.array(ops.top_p(lp, 0.6).astype(mx.float32))).tolist() == [[True, True, False]]
    assert np.isfinite(np.array(ops.top_p(lp, 5.0).astype(mx.float32))).all()  # past the whole mass: all kept
    with pytest.raises(ValueError, match="float32"):  # the op itself takes float32 only
        K.top_p(lp, 0.6)


def np_argmax(row: np.ndarray) -> int:
    """MLX's rule, written out: the first NaN where the row has one, else the first of the largest values."""
    nans = np.flatnonzero(np.isnan(row))
    return int(nans[0]) if nans.size else int(np.flatnonzero(row == row.max())[0])


@needs_kernels
@pytest.mark.parametrize("vocab", [1, 7, 13, 262144])
def test_argmax_is_the_first_largest_value_of_each_row(K, vocab):
    """Rows of logits with ties, -inf, +inf and NaN (in the vector lanes and in the tail): numpy's rule above and
    MLX's argmax alike, in any number of rows (the threaded path from 16,384 values a row)."""
    rng = np.random.default_rng(vocab)
    x = (rng.standard_normal((9, vocab)) * 5).astype(np.float32)
    x[1] = np.round(x[1])  # many ties
    x[2, -1] = x[2].max() + 1  # the largest in the tail
    x[3] = -np.inf
    x[4, vocab // 2 :] = np.inf
    x[5, vocab // 3] = np.nan
    x[6, [vocab - 1, vocab // 2]] = [np.nan, np.nan]
    x[7, vocab // 2 :] = x[7].max() + 1  # a run of equal largest values
    got = np.array(K.argmax(mx.array(x)))
    assert got.dtype == np.uint32 and got.shape == (9,)
    assert got.tolist() == [np_argmax(r) for r in x]
    assert got.tolist() == np.array(mx.argmax(mx.array(x), axis=-1)).tolist()
    assert K.argmax(mx.array(x[0])).item() == np_argmax(x[0])  # one row, (V,) -> ()
    three = mx.array(x[:8].reshape(2, 4, vocab))
    assert np.array(K.argmax(three)).tolist() == [[np_argmax(r) for r in x[:4]], [np_argmax(r) for r in x[4:8]]]


@needs_kernels
@pytest.mark.parametrize("vocab", [5, 262144])
def test_log_softmax_is_the_subtract_of_logsumexp_bit_for_bit(K, vocab):
    rng = np.random.default_rng(vocab + 1)
    x = (rng.standard_normal((3, vocab)) * 8).astype(np.float32)
    x[1, : vocab // 2] = -np.inf
    got = K.log_softmax(mx.array(x))
    x64, top = x.astype(np.float64), x.max(-1, keepdims=True).astype(np.float64)
    want = x64 - (top + np.log(np.exp(x64 - top).sum(-1, keepdims=True)))  # float64 log-softmax
    finite = np.isfinite(x)
    assert np.abs(np.array(got)[finite] - want[finite]).max() < 1e-5 * max(1.0, np.abs(want[finite]).max())
    assert np.all(np.array(got)[~finite] == -np.inf)
    x_m = mx.array(x)
    np.testing.assert_array_equal(np.array(got), np.array(x_m - K.logsumexp(x_m)))
    other = K.log_softmax(x_m.astype(mx.bfloat16))  # not float32: MLX's ops
    assert other.dtype == mx.bfloat16
    want_b = x_m.astype(mx.bfloat16) - mx.logsumexp(x_m.astype(mx.bfloat16), axis=-1, keepdims=True)
    np.testing.assert_array_equal(np.array(other.astype(mx.float32)), np.array(want_b.astype(mx.float32)))


@needs_kernels
def test_rows_sampled_on_a_kernels_model_use_its_nucleus_op(tiny_gguf: dict[str, Path]):
    engine = lmx.load(tiny_gguf["qwen3"], device="cpu", cpu_kernels=True)
    ops = engine.loaded.model.ops
    assert isinstance(ops, CpuKernelOps)
    calls = []
    real = ops.top_p
    ops.top_p = lambda logprobs, reach: calls.append(reach) or real(logprobs, reach)  # type: ignore[method-assign]
    try:
        engine.generate("hello", max_tokens=3, temperature=1.0, top_p=0.9, seed=1)
    finally:
        del ops.top_p
    assert len(calls) >= 3 and all(abs(r - 0.9) < 1e-5 for r in calls)  # a draw a token (and a queued step)


@needs_kernels
@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_categorical_draws_the_float64_distribution_of_a_wide_row(K, temperature):
    """10,000 draws from one 3,000-token row (12 blocks of the kernel's partial sums), each with its
    own uniform number: the ten likeliest tokens and the rest, against float64 softmax(x / T)."""
    rng = np.random.default_rng(int(temperature * 10))
    row = (rng.standard_normal(3000) * 2).astype(np.float32)
    row[rng.integers(0, 3000, 500)] = -np.inf
    n = 10_000
    u = mx.random.uniform(shape=(n,), key=mx.random.key(7))
    drawn = np.array(K.categorical(mx.broadcast_to(mx.array(row[None]), (n, 3000)), u, temperature))
    assert np.all(np.isfinite(row[drawn]))
    probs = np.exp((row.astype(np.float64) - row.max()) / temperature)
    probs /= probs.sum()
    top = np.argsort(-probs)[:10]
    counts = np.array([np.sum(drawn == t) for t in top] + [n - np.isin(drawn, top).sum()])
    want = np.append(probs[top], 1 - probs[top].sum()) * n
    chi2 = float(np.sum((counts - want) ** 2 / want))
    assert chi2 < 35.56, (counts, want)  # the 99.99% quantile of chi-square with 10 degrees of freedom


@needs_kernels
def test_categorical_rejects_bad_arguments(K):
    x = mx.zeros((2, 5))
    for args, what in [
        ((x.astype(mx.float16), mx.zeros((2,)), 1.0), "logits"),
        ((x, mx.zeros((3,)), 1.0), "u must"),
        ((x, mx.zeros((2,)), 0.0), "temperature"),
        ((x, mx.zeros((2,)), float("nan")), "temperature"),
    ]:
        with pytest.raises(ValueError, match=what):
            K.categorical(*args)
    assert np.array(K.categorical(mx.full((1, 4), -mx.inf), mx.zeros((1,)), 1.0)).tolist() == [0]


@needs_kernels
def test_kernel_draw_takes_every_temperature_the_options_allow(K):
    ops = CpuKernelOps(K)
    logits = mx.array([[0.0, 5.0, -mx.inf, 1.0]])
    key = mx.random.key(3)
    assert ops.categorical(logits, 1e-300, key).tolist() == [1]  # as good as greedy
    flat = [ops.categorical(logits, 1e300, mx.random.key(i)).item() for i in range(200)]
    assert set(flat) == {0, 1, 3}  # uniform over the finite tokens

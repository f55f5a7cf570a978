"""lmx's one-query CUDA attention (lmx.kernels.cuda_attention): when it is used, and its input rules.

The kernel itself needs a CUDA GPU; its values are checked there by
``benchmarks/cuda_attention_check.py`` (against a float32 reference and MLX's own path). Here:
the module imports and stays off without CUDA, ``attention()`` hands it exactly the cases it is
meant for, and unsupported inputs are refused with a clear error.
"""

from __future__ import annotations

import hashlib

import pytest

import lmx  # noqa: F401  # isort: skip  (loads OpenBLAS before mlx.core)
import mlx.core as mx

from lmx.kernels import cuda_attention, cuda_dense, cuda_quantized
from lmx.models import base
from lmx.runtime.ops import CudaOps


def qkv(d: int = 256, heads: int = 4, kv_heads: int = 1, keys: int = 9, dtype: mx.Dtype = mx.bfloat16):
    q = mx.zeros((1, heads, 1, d), dtype=dtype)  # (B, H, 1, D)
    k = mx.zeros((1, kv_heads, keys, d), dtype=dtype)  # (B, H_kv, L, D)
    return q, k, k


def test_off_without_cuda() -> None:
    if cuda_attention.cuda_available() and mx.default_device() == mx.gpu:
        pytest.skip("a CUDA GPU is the default device here")
    assert not cuda_attention.wanted(*qkv(), 0.0625)


def test_supported_shapes_and_dtypes() -> None:
    assert cuda_attention.supported(*qkv())
    assert cuda_attention.supported(*qkv(d=128, heads=8, kv_heads=2, dtype=mx.float32))
    assert not cuda_attention.supported(*qkv(d=80))  # not a multiple of 32
    assert not cuda_attention.supported(*qkv(d=2048))  # above MAX_HEAD_DIM
    assert not cuda_attention.supported(*qkv(heads=4, kv_heads=3))  # H not a multiple of H_kv
    assert not cuda_attention.supported(*qkv(keys=0))
    q, k, v = qkv()
    assert not cuda_attention.supported(mx.zeros((1, 4, 2, 256), dtype=mx.bfloat16), k, v)  # two queries
    assert not cuda_attention.supported(q, k.astype(mx.float32), v)  # mixed dtypes
    assert not cuda_attention.supported(q.astype(mx.int32), k.astype(mx.int32), v.astype(mx.int32))


def test_decode_attention_refuses_unsupported_inputs() -> None:
    with pytest.raises(ValueError, match="decode_attention takes"):
        cuda_attention.decode_attention(*qkv(d=80), 0.1)
    with pytest.raises(ValueError, match="scale > 0"):
        cuda_attention.decode_attention(*qkv(), 0.0)


def test_env_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    for value, on in (("0", False), ("off", False), ("no", False), ("1", True), ("", True)):
        monkeypatch.setenv(cuda_attention.ENV_SWITCH, value)
        assert cuda_attention.enabled_by_env() is on
    monkeypatch.delenv(cuda_attention.ENV_SWITCH)
    assert cuda_attention.enabled_by_env()


def test_wanted_only_where_mlx_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a (pretended) CUDA GPU: head dims MLX fuses and the switch keep MLX's path."""
    monkeypatch.setattr(cuda_attention, "cuda_available", lambda: True)
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)
    assert cuda_attention.wanted(*qkv(d=256), 0.0625)
    assert cuda_attention.wanted(*qkv(d=512, dtype=mx.float32), 0.0625)
    for d in sorted(cuda_attention.FUSED_HEAD_DIMS):
        assert not cuda_attention.wanted(*qkv(d=d), d**-0.5)
    assert not cuda_attention.wanted(*qkv(), -1.0)
    monkeypatch.setenv(cuda_attention.ENV_SWITCH, "0")
    assert not cuda_attention.wanted(*qkv(), 0.0625)


def test_attention_routes_one_unmasked_query(monkeypatch: pytest.MonkeyPatch) -> None:
    """attention() calls the kernel for one query without a mask or softcap, and only then."""
    calls = []

    def fake(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
        calls.append(scale)
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)

    monkeypatch.setattr(cuda_attention, "decode_attention_fitted", fake)
    ops = CudaOps(cuda_attention)  # what the load profile gives a model on a CUDA GPU
    q, k, v = (x.astype(mx.float32) + 0.5 for x in qkv())
    base.attention(q, k, v, 0.0625, None, ops=ops)
    assert calls == [0.0625]
    base.attention(q, k, v, 0.0625, mx.ones((1, 1, 1, k.shape[2]), dtype=mx.bool_), ops=ops)  # a mask array
    base.attention(q, k, v, 0.0625, None, softcap=50.0, ops=ops)
    long_q = mx.zeros((1, 4, 3, 256))
    base.attention(long_q, k, v, 0.0625, "causal", ops=ops)  # prefill
    q128, k128, v128 = (x.astype(mx.float32) for x in qkv(d=128))
    base.attention(q128, k128, v128, 128**-0.5, None, ops=ops)  # a head dim MLX fuses
    assert calls == [0.0625]
    base.attention(q, k, v, 0.0625, None)  # MLX's ops (the default)
    assert calls == [0.0625]


def test_gradient_is_that_of_mlx_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel has no backward pass: decode_attention differentiates as MLX's attention does.
    (Here the kernel is replaced by MLX's attention behind stop_gradient, which the CPU can run.)"""

    def forward_only(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:  # no gradient, as the kernel
        return mx.stop_gradient(mx.fast.scaled_dot_product_attention(q, k, v, scale=scale))

    monkeypatch.setattr(cuda_attention, "_run", forward_only)
    cuda_attention._differentiable.cache_clear()
    try:
        q = mx.random.normal((1, 4, 1, 256), key=mx.random.key(0))
        k = mx.random.normal((1, 2, 7, 256), key=mx.random.key(1))
        v = mx.random.normal((1, 2, 7, 256), key=mx.random.key(2))

        def loss(f):
            return lambda q, k, v: (f(q, k, v) ** 2).sum()

        ours = mx.grad(loss(lambda q, k, v: cuda_attention.decode_attention(q, k, v, 0.0625)), argnums=(0, 1, 2))(
            q, k, v
        )
        mlx = mx.grad(
            loss(lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.0625)), argnums=(0, 1, 2)
        )(q, k, v)
        for a, b in zip(ours, mlx):
            assert mx.allclose(a, b, atol=1e-6).item()
            assert mx.abs(a).max().item() > 0
    finally:
        cuda_attention._differentiable.cache_clear()


def test_inference_skips_the_gradient_wrapper(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside inference() (the segmented decode step) the kernel runs bare; outside it is wrapped."""
    calls = []
    monkeypatch.setattr(cuda_attention, "_run", lambda q, k, v, s: calls.append(s) or q)
    monkeypatch.setattr(cuda_attention, "_differentiable", lambda s: lambda q, k, v: calls.append(("wrapped", s)) or q)
    q, k, v = qkv()
    with cuda_attention.inference():
        cuda_attention.decode_attention(q, k, v, 0.5)
    cuda_attention.decode_attention(q, k, v, 0.25)
    assert calls == [0.5, ("wrapped", 0.25)]


def test_padded_rows_take_the_kernel_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """CudaOps(padded=True) sends padded one-query rows to decode_attention_from (inside inference
    only: it has no gradient); without it, or outside inference, MLX's masked attention runs. The
    results equal the mask-array path's either way (the fake kernel is MLX's masked attention)."""
    calls = []

    def fake(q: mx.array, k: mx.array, v: mx.array, scale: float, first: mx.array) -> mx.array:
        calls.append(first.tolist())
        mask = (mx.arange(k.shape[2])[None] >= first[:, None])[:, None, None]
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)

    monkeypatch.setattr(cuda_attention, "decode_attention_from", fake)
    monkeypatch.setattr(cuda_attention, "inference_active", lambda: True)
    q = mx.random.normal((2, 4, 1, 256), key=mx.random.key(1))
    k = mx.random.normal((2, 1, 9, 256), key=mx.random.key(2))
    v = mx.random.normal((2, 1, 9, 256), key=mx.random.key(3))
    first = mx.array([0, 4], dtype=mx.int32)
    want = CudaOps(cuda_attention).attention_from(q, k, v, 0.0625, first)  # not asked: MLX's mask path
    assert calls == [] and not CudaOps(cuda_attention).indexes_padding
    padded = CudaOps(cuda_attention, padded=True)
    assert padded.indexes_padding
    got = padded.attention_from(q, k, v, 0.0625, first)
    assert calls == [[0, 4]]
    assert mx.allclose(got, want, atol=1e-6).item()
    monkeypatch.setattr(cuda_attention, "inference_active", lambda: False)
    padded.attention_from(q, k, v, 0.0625, first)  # a graph that may be differentiated
    assert calls == [[0, 4]]


def test_decode_attention_from_refuses_what_it_cannot_take() -> None:
    q, k, v = (x.astype(mx.float32) for x in qkv())
    with pytest.raises(ValueError, match="first must be"), cuda_attention.inference():
        cuda_attention.decode_attention_from(q, k, v, 0.0625, mx.array([0, 1], dtype=mx.int32))
    with pytest.raises(ValueError, match="no gradient"):
        cuda_attention.decode_attention_from(q, k, v, 0.0625, mx.array([0], dtype=mx.int32))


def test_the_padded_switch_reaches_the_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmx.runtime.profile import choose_profile, make_ops

    profile = choose_profile("gpu", backend="cuda", cuda_attention=True)
    assert not make_ops(profile, cuda=cuda_attention).indexes_padding
    assert make_ops(profile, cuda=cuda_attention, cuda_padded=True).indexes_padding
    monkeypatch.setenv("LMX_CUDA_PADDED_ATTENTION", "1")
    assert cuda_attention.padded_by_env()
    monkeypatch.setenv("LMX_CUDA_PADDED_ATTENTION", "0")
    assert not cuda_attention.padded_by_env()


def test_each_kernel_s_name_carries_a_digest_of_its_source(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLX keys a compiled custom kernel (in the process and in its PTX cache on disk) by name and
    template arguments only: a changed source under an old name would run the old binary."""
    made: list[dict] = []
    monkeypatch.setattr(mx.fast, "cuda_kernel", lambda **kw: made.append(kw) or object())
    factories = [
        lambda: cuda_attention._kernel("all"),
        lambda: cuda_attention._kernel("first"),
        lambda: cuda_attention._kernel("span"),
        lambda: cuda_attention._kernel("all", True),
        lambda: cuda_attention._kernel("first", True),
        lambda: cuda_attention._kernel("span", True),
        lambda: cuda_attention._kernel("all", False, True),
        lambda: cuda_attention._kernel("span", True, True),
        cuda_attention._combine_kernel,
        cuda_quantized._kernel,
        cuda_dense._kernel,
    ]
    caches = [cuda_attention._kernel, cuda_attention._combine_kernel, cuda_quantized._kernel, cuda_dense._kernel]
    for cache in caches:
        cache.cache_clear()
    try:
        for factory in factories:
            factory()
    finally:
        for cache in caches:  # the recorded stand-ins must not outlive the test
            cache.cache_clear()
    assert len(made) == 11
    for kw in made:
        digest = hashlib.sha256(f"{kw['header']}\0{kw['source']}".encode()).hexdigest()[:16]
        assert kw["name"].endswith("_" + digest) and kw["name"].isidentifier(), kw["name"]
    assert len({kw["name"] for kw in made}) == 11
    assert len({kw["source"] for kw in made}) == 11  # the eight attention kernels differ in their source
    name = cuda_attention.kernel_name("k", "out[0] = 1;", "")
    assert name != cuda_attention.kernel_name("k", "out[0] = 2;", "")
    assert name != cuda_attention.kernel_name("k", "out[0] = 1;", "// header")
    assert name == cuda_attention.kernel_name("k", "out[0] = 1;", "")


def test_a_compiled_step_s_span_takes_the_kernel_inside_inference_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """CudaOps.attention_span (a compiled decode step's fixed storage, slots [first, end) in use) sends
    one-query attention of any head dim the kernel takes to decode_attention_span inside inference;
    outside it (a graph that may be differentiated) MLX's masked attention runs. The result is
    attention over the span's keys alone either way (the fake kernel computes exactly that)."""
    calls = []

    def fake(q: mx.array, k: mx.array, v: mx.array, scale: float, span: mx.array) -> mx.array:
        first, end = span.tolist()
        calls.append((q.shape[-1], first, end))
        return mx.fast.scaled_dot_product_attention(q, k[:, :, first:end], v[:, :, first:end], scale=scale)

    monkeypatch.setattr(cuda_attention, "decode_attention_span", fake)
    monkeypatch.setattr(cuda_attention, "inference_active", lambda: True)
    ops = CudaOps(cuda_attention)
    for d in (256, 128):  # Qwen 3's head dim too: MLX's fused one-query kernel takes no mask
        q = mx.random.normal((2, 4, 1, d), key=mx.random.key(1))
        k = mx.random.normal((2, 1, 12, d), key=mx.random.key(2))
        v = mx.random.normal((2, 1, 12, d), key=mx.random.key(3))
        want = mx.fast.scaled_dot_product_attention(q, k[:, :, 3:9], v[:, :, 3:9], scale=0.0625)
        got = ops.attention_span(q, k, v, 0.0625, mx.array([3, 9], dtype=mx.int32))
        assert calls[-1] == (d, 3, 9)
        assert mx.allclose(got, want, atol=1e-5).item()
    monkeypatch.setattr(cuda_attention, "inference_active", lambda: False)
    masked = ops.attention_span(q, k, v, 0.0625, mx.array([3, 9], dtype=mx.int32))
    assert len(calls) == 2  # not the kernel: MLX's masked path, the same values
    assert mx.allclose(masked, want, atol=1e-5).item()
    off = CudaOps(cuda_attention, attention=False)  # LMX_CUDA_ATTENTION=0
    monkeypatch.setattr(cuda_attention, "inference_active", lambda: True)
    off.attention_span(q, k, v, 0.0625, mx.array([3, 9], dtype=mx.int32))
    assert len(calls) == 2


def test_decode_attention_span_refuses_what_it_cannot_take() -> None:
    q, k, v = (x.astype(mx.float32) for x in qkv())
    with pytest.raises(ValueError, match="span must be"), cuda_attention.inference():
        cuda_attention.decode_attention_span(q, k, v, 0.0625, mx.array([0, 1, 2], dtype=mx.int32))
    with pytest.raises(ValueError, match="span must be"), cuda_attention.inference():
        cuda_attention.decode_attention_span(q, k, v, 0.0625, mx.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="no gradient"):
        cuda_attention.decode_attention_span(q, k, v, 0.0625, mx.array([0, 1], dtype=mx.int32))


def test_the_tiled_loop_s_layout_keeps_rows_in_registers_and_partials_in_shared_memory() -> None:
    """``layout``: the tiled loop where a lane's share of a row is whole 32-bit words, with at most 32
    registers of loaded rows a warp (2 x keys x words; one key where a row alone is more) and 16 warps (512 threads: 128 registers each,
    what benchmarks/cuda_compile_check.py checks nvcc's counts against); the strided loop otherwise.
    Every block's partial outputs (warps x head dim floats) stay within 32 KiB of shared memory."""
    for itemsize in (2, 4):
        for d in (32, 64, 128, 256, 512, 1024):
            words = d // 32 * itemsize // 4
            tiled, warps, kt = cuda_attention.layout(d, itemsize, tiled=True)
            assert tiled == (words >= 1), (d, itemsize)
            assert warps * d * 4 <= 32 * 1024
            if tiled:
                assert warps <= 16 and 1 <= kt <= 8 and (kt * words <= 16 or kt == 1), (d, itemsize, kt)
            else:
                assert kt == 1
            assert cuda_attention.layout(d, itemsize, tiled=False)[0] is False
    assert cuda_attention.layout(256, 2, tiled=True) == (True, 16, 4)  # Gemma 3's head dim in bf16
    assert cuda_attention.layout(128, 2, tiled=True) == (True, 16, 8)  # Qwen 3's


def test_the_kernel_is_called_with_its_loop_and_tile(monkeypatch: pytest.MonkeyPatch) -> None:
    """``_run`` passes the loop (``TILED``) and keys a warp (``KT``) as template constants and launches
    ``warps x 32`` threads a block: the tiled loop over ``TILED_MIN_KEYS`` keys or more (a view's
    length: a compiled step's storage), the strided one below, and with ``TILED_KEYS = False`` (the
    benchmarks' A/B) the strided one for any length."""
    launched: list[dict] = []

    def kernel(**kw):
        launched.append(kw)
        return [mx.zeros(kw["output_shapes"][0], kw["output_dtypes"][0])]

    monkeypatch.setattr(cuda_attention, "_kernel", lambda which="all", split=False, tiled=False: kernel)
    q = mx.zeros((1, 4, 1, 256), mx.bfloat16)
    long = mx.zeros((1, 1, cuda_attention.TILED_MIN_KEYS, 256), mx.bfloat16)
    short = long[:, :, : cuda_attention.TILED_MIN_KEYS - 1]
    cuda_attention._run(q, long, long, 0.0625)
    cuda_attention._run(q, short, short, 0.0625)
    monkeypatch.setattr(cuda_attention, "TILED_KEYS", False)
    cuda_attention._run(q, long, long, 0.0625)
    templates = [dict(kw["template"]) for kw in launched]
    assert [(t["TILED"], t["KT"], t["WARPS"]) for t in templates] == [(True, 4, 16), (False, 1, 32), (False, 1, 32)]
    assert [kw["threadgroup"][0] for kw in launched] == [16 * 32, 32 * 32, 32 * 32]


def test_split_keys_run_two_kernels_whose_second_combines_the_first_s_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``SPLIT_KEYS`` on (off by default until measured), over ``SPLIT_MIN_KEYS`` keys or more the
    split kernel runs ``splits()`` blocks per (head, row) (the grid's z) into float32 partial results,
    and the combining kernel turns exactly those into the (B, H, 1, D) output in the queries' dtype;
    below the threshold one kernel runs, as with the switch off."""
    calls: list[tuple[str, dict]] = []

    def stand_in(kind: str):
        def kernel(**kw):
            calls.append((kind, kw))
            return [mx.zeros(shape, dtype) for shape, dtype in zip(kw["output_shapes"], kw["output_dtypes"])]

        return kernel

    monkeypatch.setattr(
        cuda_attention, "_kernel", lambda which="all", split=False, tiled=False: stand_in(f"{which}:{split}:{tiled}")
    )
    monkeypatch.setattr(cuda_attention, "_combine_kernel", lambda: stand_in("combine"))
    monkeypatch.setattr(cuda_attention, "SPLIT_KEYS", True)
    q = mx.zeros((2, 4, 1, 256), mx.bfloat16)
    long = mx.zeros((2, 1, cuda_attention.SPLIT_MIN_KEYS, 256), mx.bfloat16)
    out = cuda_attention._run(q, long, long, 0.0625, mx.array([0, 9], dtype=mx.int32), "span")
    assert out.shape == (2, 4, 1, 256) and out.dtype == mx.bfloat16
    (first, parts_kw), (second, combine_kw) = calls
    parts = cuda_attention.splits(2, 4, cuda_attention.SPLIT_MIN_KEYS)
    assert first == "span:True:True" and second == "combine" and parts > 1
    assert parts_kw["grid"][2] == parts and parts_kw["output_shapes"] == [(2, 4, parts, 256), (2, 4, parts, 2)]
    assert parts_kw["output_dtypes"] == [mx.float32, mx.float32]
    assert [a.shape for a in combine_kw["inputs"]] == [(2, 4, parts, 256), (2, 4, parts, 2)]
    assert combine_kw["grid"][1] == 2 and combine_kw["output_dtypes"] == [mx.bfloat16]
    calls.clear()
    short = long[:, :, : cuda_attention.SPLIT_MIN_KEYS - 1]
    cuda_attention._run(q, short, short, 0.0625)
    assert [kind for kind, _ in calls] == ["all:False:False"]


def test_splits_give_about_256_blocks_of_128_keys_or_more() -> None:
    assert cuda_attention.splits(1, 4, 8192) == 64  # Gemma 3 270M/1B over 8k keys: 256 blocks of 128 keys
    assert cuda_attention.splits(1, 16, 8192) == 16  # Qwen 3 0.6B: 256 blocks of 512
    assert cuda_attention.splits(1, 4, 1000) == 7  # no block under 128 keys
    assert cuda_attention.splits(8, 32, 100000) == 1  # enough blocks already
    for batch, heads, keys in ((1, 1, 10**6), (1, 4, 300), (3, 8, 5000)):
        n = cuda_attention.splits(batch, heads, keys)
        assert 1 <= n <= 64 and (n == 1 or keys // n >= 128)

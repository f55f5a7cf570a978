"""lmx's CPU kernels (lmx.kernels): products against GGUF blocks equal gguf-py's dequantize + numpy.

Every expected value comes from gguf-py's numpy dequantization and a float64 numpy product, never
from the code under test. Where `make` builds the kernels (Linux x86_64) they must be there:
a failed build fails these tests. Elsewhere (macOS, other CPUs) they skip, saying why.
"""

from __future__ import annotations

import platform
import threading
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, quants
from gguf import GGMLQuantizationType as T

import lmx  # isort: skip  (loads OpenBLAS before mlx.core)
import mlx.core as mx

from conftest_gguf import random_blocks
from lmx.errors import InvalidOptionError
from lmx.kernels import GGML_TYPES, status
from lmx.kernels.build import supported_platform

pytest_plugins = ["conftest_gguf"]

TYPES = [T.Q8_0, T.Q4_0, T.Q5_0, T.Q4_K, T.Q6_K]
assert sorted(int(t) for t in TYPES) == sorted(GGML_TYPES.values())
# float32 accumulation in another order than float64 numpy: errors ~1e-7 of the largest output
RTOL = 2e-5

kernel_status = status()
needs_kernels = pytest.mark.skipif(supported_platform() is not None, reason=f"CPU kernels: {supported_platform()}")


def test_kernels_are_built_where_make_builds_them() -> None:
    if supported_platform() is None:
        assert kernel_status.available, (
            f"CPU kernels unavailable on a platform make builds them for: {kernel_status.reason}"
        )


@pytest.fixture(scope="module")
def K():
    from lmx.kernels import load_module

    module, _ = load_module()
    return module


def reference(blocks: np.ndarray, qtype: T, k: int) -> np.ndarray:
    """gguf-py's float32 values of ``blocks`` (rows, bytes per row) as (rows, k)."""
    return quants.dequantize(blocks, qtype).reshape(blocks.shape[0], k)


def close(got: np.ndarray, want: np.ndarray, rtol: float = RTOL) -> None:
    scale = max(float(np.abs(want).max()), 1e-30)
    err = float(np.abs(got.astype(np.float64) - want).max()) / scale
    assert err < rtol, f"max error {err:.2e} of the largest value"


@needs_kernels
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_rows_bit_exact(K, qtype):
    rng = np.random.default_rng(int(qtype))
    block = GGML_QUANT_SIZES[qtype][0]
    blocks = random_blocks(qtype, 13, 3 * block, rng)
    got = np.array(K.dequantize_rows(mx.array(blocks), int(qtype), 3 * block))
    np.testing.assert_array_equal(got, reference(blocks, qtype, 3 * block))


@needs_kernels
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 37])  # 37: above the GEMV limit (dequantize + BLAS)
def test_qmatmul_matches_numpy(K, qtype, rows):
    rng = np.random.default_rng(rows * 100 + int(qtype))
    block = GGML_QUANT_SIZES[qtype][0]
    for n, k in ((1, block), (67, 2 * block), (301, 5 * block)):  # odd row counts, several blocks a row
        blocks = random_blocks(qtype, n, k, rng)
        x = rng.standard_normal((rows, k)).astype(np.float32)
        got = np.array(K.qmatmul(mx.array(x), mx.array(blocks), int(qtype), k))
        assert got.shape == (rows, n)
        close(got, x.astype(np.float64) @ reference(blocks, qtype, k).astype(np.float64).T)


@needs_kernels
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_a_row_gives_the_same_bits_alone_and_in_a_batch(K, qtype):
    """Decode (1 row) may take another code path than a batch; a row's result must not change."""
    rng = np.random.default_rng(5)
    blocks = mx.array(random_blocks(qtype, 70, 512, rng))
    x = rng.standard_normal((1, 512)).astype(np.float32)
    alone = np.array(K.qmatmul(mx.array(x), blocks, int(qtype), 512))
    batch = np.array(K.qmatmul(mx.array(np.concatenate([x, -x, x])), blocks, int(qtype), 512))
    np.testing.assert_array_equal(alone[0], batch[0])
    np.testing.assert_array_equal(alone[0], batch[2])


@needs_kernels
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_m_rows_equal_m_one_row_products_bit_for_bit(K, qtype):
    """m = 1..8 rows share each decoded W row (several rows of x per pass); every row of the product must
    still be exactly its one-row product, which is what decode and a speculative verify pass compare."""
    rng = np.random.default_rng(17 + int(qtype))
    k = 3 * GGML_QUANT_SIZES[qtype][0] if qtype in (T.Q4_K, T.Q6_K) else 20 * GGML_QUANT_SIZES[qtype][0]
    blocks = random_blocks(qtype, 45, k, rng)
    want = reference(blocks, qtype, k).astype(np.float64)
    w = mx.array(blocks)
    x = rng.standard_normal((8, k)).astype(np.float32)
    one_row = np.concatenate([np.array(K.qmatmul(mx.array(x[i : i + 1]), w, int(qtype), k)) for i in range(8)])
    close(one_row, x.astype(np.float64) @ want.T)
    try:
        for avx512 in (True, False):  # where the CPU has AVX-512VL, its copy (8 rows a pass) and AVX2's (4)
            K.set_avx512(avx512)
            for m in range(1, 9):
                got = np.array(K.qmatmul(mx.array(x[:m]), w, int(qtype), k))
                np.testing.assert_array_equal(got, one_row[:m], err_msg=f"m={m}, avx512 allowed: {avx512}")
    finally:
        K.set_avx512(True)
    if K.has_avx2():  # the opt-in int8 path unpacks each W row once for all m rows too
        one_int8 = [
            np.array(K.qmatmul(mx.array(x[i : i + 1]), w, int(qtype), k, int8_activations=True)) for i in range(8)
        ]
        one_int8 = np.concatenate(one_int8)
        for m in range(1, 9):
            got = np.array(K.qmatmul(mx.array(x[:m]), w, int(qtype), k, int8_activations=True))
            np.testing.assert_array_equal(got, one_int8[:m], err_msg=f"int8, m={m}")


@needs_kernels
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_prefetching_weight_rows_leaves_products_unchanged(K, qtype):
    """Decode products ask memory for W rows ahead of the one they decode (set_prefetch_rows): any
    distance, none, or one past the last row of a task gives the same bits, and the right values."""
    rng = np.random.default_rng(29 + int(qtype))
    k = 2 * GGML_QUANT_SIZES[qtype][0] if qtype in (T.Q4_K, T.Q6_K) else 10 * GGML_QUANT_SIZES[qtype][0]
    blocks = random_blocks(qtype, 61, k, rng)
    w = mx.array(blocks)
    x = rng.standard_normal((8, k)).astype(np.float32)
    x_want = x.astype(np.float64) @ reference(blocks, qtype, k).astype(np.float64).T
    try:
        for int8 in (False, True) if K.has_avx2() else (False,):
            want = None
            for ahead in (0, 1, 4, 60, 61, 1000):
                K.set_prefetch_rows(ahead)
                got = [np.array(K.qmatmul(mx.array(x[:m]), w, int(qtype), k, int8_activations=int8)) for m in (1, 3, 8)]
                if want is None:
                    want = got
                    if not int8:
                        for m, g in zip((1, 3, 8), got):
                            close(g, x_want[:m])
                for m, g, h in zip((1, 3, 8), got, want):
                    np.testing.assert_array_equal(g, h, err_msg=f"prefetch {ahead} rows, m={m}, int8 {int8}")
    finally:
        K.set_prefetch_rows(4)


@needs_kernels
@pytest.mark.parametrize("rows", [1, 3, 37])  # decode, several rows, prefill (dequantize + BLAS)
def test_qmatmul_reads_strided_x_and_adds_no_copy_op(K, rows, tmp_path):
    """x is read through its strides when the product runs (a view costs no Contiguous op), and the
    weights, evaluated already, get none either: a decode step's products add no ops but themselves."""
    rng = np.random.default_rng(23 + rows)
    blocks = mx.array(random_blocks(T.Q8_0, 40, 128, rng))
    mx.eval(blocks)
    wide = mx.array(rng.standard_normal((rows, 3 * 128)).astype(np.float32))
    views = {
        "every third column": wide[:, ::3],
        "transposed": mx.array(rng.standard_normal((128, rows)).astype(np.float32)).T,
        "a column slice": wide[:, 128:256],
    }
    for name, x in views.items():
        got = K.qmatmul(x, blocks, int(T.Q8_0), 128)
        dot = tmp_path / f"{name}.dot"
        mx.export_to_dot(str(dot), got)
        assert "Contiguous" not in dot.read_text(), name
        want = np.array(x).astype(np.float64) @ reference(np.array(blocks), T.Q8_0, 128).astype(np.float64).T
        close(np.array(got), want)
        np.testing.assert_array_equal(
            np.array(got), np.array(K.qmatmul(mx.array(np.array(x)), blocks, int(T.Q8_0), 128))
        )


@needs_kernels
def test_qmatmul_batched_shape_and_bfloat16_input(K):
    rng = np.random.default_rng(1)
    blocks = random_blocks(T.Q4_K, 96, 512, rng)
    x = rng.standard_normal((2, 3, 512)).astype(np.float32)
    got = K.qmatmul(mx.array(x), mx.array(blocks), int(T.Q4_K), 512)
    assert got.shape == (2, 3, 96) and got.dtype == mx.float32
    close(np.array(got), x.astype(np.float64) @ reference(blocks, T.Q4_K, 512).astype(np.float64).T)
    got16 = K.qmatmul(mx.array(x).astype(mx.bfloat16), mx.array(blocks), int(T.Q4_K), 512)
    assert got16.dtype == mx.bfloat16


@needs_kernels
@pytest.mark.parametrize("rows", [1, 7, 24])  # 7: two passes of x rows; 24: prefill, W blocks shared out
def test_multithreaded_rows_equal_single_thread(K, rows):
    rng = np.random.default_rng(2)
    blocks = mx.array(random_blocks(T.Q8_0, 4099, 640, rng))  # large enough to be split over the pool
    x = mx.array(rng.standard_normal((rows, 640)).astype(np.float32))
    before = K.num_threads()
    try:
        K.set_num_threads(1)
        one = np.array(K.qmatmul(x, blocks, int(T.Q8_0), 640))
        K.set_num_threads(3)
        assert K.num_threads() == 3
        three = np.array(K.qmatmul(x, blocks, int(T.Q8_0), 640))
    finally:
        K.set_num_threads(before)
    np.testing.assert_array_equal(one, three)  # each row is computed whole by one thread


@needs_kernels
def test_pool_shared_by_several_python_threads(K):
    """Several threads calling at once take turns on the pool: all finish, all results are right."""
    rng = np.random.default_rng(3)
    raw = random_blocks(T.Q5_0, 2048, 640, rng)
    blocks = mx.array(raw)
    want = reference(raw, T.Q5_0, 640).astype(np.float64)
    xs = [rng.standard_normal((1, 640)).astype(np.float32) for _ in range(4)]
    errors: list[BaseException] = []

    def work(x: np.ndarray) -> None:
        try:
            stream = mx.new_stream(mx.cpu)
            for _ in range(20):
                got = K.qmatmul(mx.array(x), blocks, int(T.Q5_0), 640, stream=stream)
                close(np.array(got), x.astype(np.float64) @ want.T)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(x,)) for x in xs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread is stuck: the pool deadlocked"
    assert not errors, errors


@needs_kernels
def test_gradient_with_respect_to_x(K):
    rng = np.random.default_rng(4)
    raw = random_blocks(T.Q6_K, 24, 256, rng)
    blocks = mx.array(raw)
    x = mx.array(rng.standard_normal((2, 256)).astype(np.float32))
    grad = mx.grad(lambda x: K.qmatmul(x, blocks, int(T.Q6_K), 256).sum())(x)
    want = np.ones((2, 24)) @ reference(raw, T.Q6_K, 256).astype(np.float64)
    close(np.array(grad), want)


@needs_kernels
def test_bad_arguments_are_errors(K):
    blocks = mx.zeros((4, 34), dtype=mx.uint8)
    with pytest.raises(ValueError, match="unsupported GGML type"):
        K.qmatmul(mx.zeros((1, 32)), blocks, 1, 32)
    with pytest.raises(ValueError, match="rows of 34 bytes"):
        K.qmatmul(mx.zeros((1, 64)), mx.zeros((4, 35), dtype=mx.uint8), int(T.Q8_0), 32)
    with pytest.raises(ValueError, match="last dimension 32"):
        K.qmatmul(mx.zeros((1, 64)), blocks, int(T.Q8_0), 32)


# ------------------------------------------------------------------------------- models on the kernels


def _last_logits(engine, ids: list[int]) -> np.ndarray:
    return np.array(engine.loaded.model(mx.array([ids]))[0, -1])


@needs_kernels
def test_tiny_gguf_on_kernels_equals_float32(tiny_gguf: dict[str, Path]):
    """Mixed block types (the kernels' and others) and an untied Q6_K head."""
    fast = lmx.load(tiny_gguf["qwen3"], device="cpu", cpu_kernels=True)
    plain = lmx.load(tiny_gguf["qwen3"], device="cpu", cpu_kernels=False)
    assert fast.loaded.cpu_kernels and not plain.loaded.cpu_kernels
    for ids in ([5], [5, 9, 11], list(range(3, 40))):  # one token, a few (GEMV), many (dequantize + BLAS)
        want = _last_logits(plain, ids)
        # whole models: the summation-order differences of every layer add up (float32 throughout)
        close(_last_logits(fast, ids), want.astype(np.float64), rtol=1e-4)


def test_switched_off_by_argument_and_environment(tiny_gguf: dict[str, Path], monkeypatch: pytest.MonkeyPatch):
    from lmx.models.gguf_layers import uses_gguf_blocks

    engine = lmx.load(tiny_gguf["qwen3"], device="cpu", cpu_kernels=False)
    assert not engine.loaded.cpu_kernels and not uses_gguf_blocks(engine.loaded.model)
    monkeypatch.setenv("LMX_CPU_KERNELS", "0")
    engine = lmx.load(tiny_gguf["qwen3"], device="cpu")
    assert not engine.loaded.cpu_kernels and not uses_gguf_blocks(engine.loaded.model)
    assert not status().available and status().reason == "LMX_CPU_KERNELS=0"


def test_required_but_unavailable_is_a_typed_error(tiny_gguf: dict[str, Path], monkeypatch: pytest.MonkeyPatch):
    from lmx.kernels import load_module

    monkeypatch.setattr("lmx.kernels.load_module", lambda: (None, "not built (test)"))
    try:
        with pytest.raises(InvalidOptionError, match="not built"):
            lmx.load(tiny_gguf["qwen3"], device="cpu", cpu_kernels=True)
        engine = lmx.load(tiny_gguf["qwen3"], device="cpu")  # auto: falls back to float32
        assert not engine.loaded.cpu_kernels
    finally:
        load_module.cache_clear()


def _huge_pages_expected() -> bool:
    """Whether this kernel offers MADV_COLLAPSE (6.1 on) with transparent huge pages switched on."""
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    major, minor = (int(v) for v in platform.release().split(".")[:2])
    return "[never]" not in mode and (major, minor) >= (6, 1)


def _huge_bytes_at(address: int) -> int:
    """AnonHugePages of the mapping of this process that holds ``address`` (/proc/self/smaps), in bytes."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1]) * 1024
    return 0


@needs_kernels
def test_huge_pages_back_whole_2mib_pages_and_keep_the_values(K):
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, size=(7 << 20,), dtype=np.uint8)
    w = mx.array(data)
    with pytest.raises(ValueError, match="must be evaluated"):
        K.huge_pages(w + 1)
    mx.eval(w)
    small = mx.array(data[: 1 << 20])
    mx.eval(small)
    assert K.huge_pages(small) == 0  # no whole 2 MiB page inside 1 MiB
    start = np.array(w, copy=False).ctypes.data
    interior = ((start + w.nbytes) >> 21 << 21) - ((start + (1 << 21) - 1) >> 21 << 21)
    backed = K.huge_pages(w)
    assert backed in (0, interior)
    if _huge_pages_expected():
        assert backed == interior and _huge_bytes_at(start + (2 << 20)) >= interior
    np.testing.assert_array_equal(np.array(w), data)  # the values stay


@needs_kernels
@pytest.mark.skipif(not _huge_pages_expected(), reason="needs Linux 6.1+ with transparent huge pages on")
def test_loading_puts_the_gguf_head_on_huge_pages(gemma_gguf: Path, monkeypatch: pytest.MonkeyPatch):
    """The tied head (178 MB of Q8_0) is read once a token: the loader backs it with 2 MiB pages."""
    engine = lmx.load(gemma_gguf, device="cpu", cpu_kernels=True)
    head = engine.loaded.model.model.embed_tokens.weight
    start = np.array(head, copy=False).ctypes.data
    # (the whole interior where memory has free 2 MiB pages: at least half, so a fragmented host passes)
    assert _huge_bytes_at(start + head.nbytes // 2) >= head.nbytes // 2
    ids = engine.tokenizer.encode("The capital of France is")
    want = engine.generate(ids, max_tokens=4, temperature=0).tokens
    monkeypatch.setenv("LMX_CPU_HUGE_PAGES", "0")
    plain = lmx.load(gemma_gguf, device="cpu", cpu_kernels=True)
    if "[madvise]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text():
        head = plain.loaded.model.model.embed_tokens.weight
        assert _huge_bytes_at(np.array(head, copy=False).ctypes.data + head.nbytes // 2) == 0
    assert plain.generate(ids, max_tokens=4, temperature=0).tokens == want


@needs_kernels
@pytest.mark.slow
def test_real_model_logits_and_greedy_tokens(gemma_gguf: Path):
    """Gemma 3 270M: the bundled GGUF on the kernels against the same file dequantized to float32."""
    from test_real_model import PROMPTS

    fast = lmx.load(gemma_gguf, device="cpu", cpu_kernels=True)
    plain = lmx.load(gemma_gguf, device="cpu", cpu_kernels=False)
    assert fast.loaded.cpu_kernels
    for prompt in PROMPTS[:4]:
        ids = fast.tokenizer.encode(prompt)
        # decode-shaped call (1 row: the GEMV kernels, the Q8_0 tied head included)
        cache_f, cache_p = fast.loaded.model.make_cache(), plain.loaded.model.make_cache()
        fast.loaded.model(mx.array([ids[:-1]]), cache_f)
        plain.loaded.model(mx.array([ids[:-1]]), cache_p)
        got = np.array(fast.loaded.model(mx.array([ids[-1:]]), cache_f)[0, -1])
        want = np.array(plain.loaded.model(mx.array([ids[-1:]]), cache_p)[0, -1]).astype(np.float64)
        err = float(np.abs(got - want).max() / np.abs(want).max())
        assert err < 1e-4, f"{prompt!r}: logits differ by {err:.2e} of the largest"
        a = fast.generate(prompt, max_tokens=32, temperature=0).tokens
        b = plain.generate(prompt, max_tokens=32, temperature=0).tokens
        assert a == b, prompt


@needs_kernels
@pytest.mark.parametrize("length", [5, 21])  # 4 rows: the GEMV primitive's VJP; 20: dequantize + matmul
def test_lora_gradients_on_kernels_equal_float32(tiny_gguf: dict[str, Path], length: int):
    """LoRA over GGUF-block layers: the adapters' gradients equal those over the float32 model."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from lmx.train.lora import apply_lora, fuse_lora

    ids = mx.array([[5 + 3 * i for i in range(length)]])

    def loss(m: nn.Module) -> mx.array:
        logits = m(ids[:, :-1])
        return nn.losses.cross_entropy(logits, ids[:, 1:]).mean()

    grads = []
    for kernels_on in (True, False):
        engine = lmx.load(tiny_gguf["qwen3"], device="cpu", cpu_kernels=kernels_on)
        model = engine.loaded.model
        apply_lora(model, rank=4, alpha=8.0, seed=0)

        _, g = nn.value_and_grad(model, loss)(model)
        grads.append(dict(tree_flatten(g)))
        if kernels_on:
            assert fuse_lora(model, dequantize=True) > 0  # merges into float layers
    fast, plain = grads
    assert fast.keys() == plain.keys() and any(k.endswith("lora_b") for k in fast)
    for name in fast:
        close(np.array(fast[name]), np.array(plain[name]).astype(np.float64), rtol=1e-3)


def test_info_reports_the_kernels(tiny_gguf: dict[str, Path]):
    from lmx.cli.info import collect

    info = collect(str(tiny_gguf["qwen3"]), "cpu")
    kernels = info["cpu_kernels"]
    assert kernels["available"] == kernel_status.available
    assert kernels["in_use"] == kernel_status.available  # a GGUF of the kernels' types uses them when built
    if not kernel_status.available:
        assert kernels["reason"]


def simulated_int8(x: np.ndarray) -> np.ndarray:
    """x with each run of 32 values rounded to int8 times |max| / 127 (llama.cpp's Q8 activations), float64."""
    blocks = x.reshape(x.shape[0], -1, 32).astype(np.float32)
    d = (np.abs(blocks).max(-1, keepdims=True) / np.float32(127)).astype(np.float32)
    inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0).astype(np.float32)
    return (np.rint(blocks * inv) * d.astype(np.float64)).reshape(x.shape)


@needs_kernels
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 3, 8, 9])  # 9: above the GEMV limit, where the product stays exact
def test_int8_activations_are_llama_cpp_arithmetic(K, qtype, rows):
    rng = np.random.default_rng(rows * 10 + int(qtype))
    k = 2 * GGML_QUANT_SIZES[qtype][0] if qtype in (T.Q4_K, T.Q6_K) else 320
    blocks = random_blocks(qtype, 67, k, rng)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block (scale 0)
    w = reference(blocks, qtype, k).astype(np.float64)
    got = np.array(K.qmatmul(mx.array(x), mx.array(blocks), int(qtype), k, int8_activations=True))
    exact = x.astype(np.float64) @ w.T
    if rows > 8:
        close(got, exact)
        return
    close(got, simulated_int8(x) @ w.T)  # the same arithmetic, to float32 summation order
    close(got, exact, rtol=2e-2)  # and an approximation of the exact product (activation rounding)
    assert not np.array_equal(got, np.array(K.qmatmul(mx.array(x), mx.array(blocks), int(qtype), k)))


@needs_kernels
def test_int8_activations_switched_on_by_environment(tiny_gguf: dict[str, Path], monkeypatch: pytest.MonkeyPatch):
    """LMX_CPU_INT8=1: every GGUF-block layer quantizes its input; the model equals one whose layers
    get inputs rounded to int8 by MLX ops written here and then multiply exactly."""
    from lmx.models.gguf_layers import GGUFEmbedding, GGUFLinear

    def layers(engine) -> list:
        return [m for _, m in engine.loaded.model.named_modules() if isinstance(m, (GGUFLinear, GGUFEmbedding))]

    exact = lmx.load(tiny_gguf["qwen3"], device="cpu", cpu_kernels=True)
    assert layers(exact) and not any(m.int8_activations for m in layers(exact))
    monkeypatch.setenv("LMX_CPU_INT8", "1")
    int8 = lmx.load(tiny_gguf["qwen3"], device="cpu", cpu_kernels=True)
    assert all(m.int8_activations for m in layers(int8)) and status().int8_activations
    ids = [5, 9, 11]
    got = _last_logits(int8, ids)

    def rounded(x: mx.array) -> mx.array:  # int8 per 32 values, as simulated_int8
        blocks = x.reshape(-1, 32)
        d = mx.abs(blocks).max(-1, keepdims=True) / 127
        return (mx.round(blocks * mx.where(d > 0, 1 / mx.where(d > 0, d, 1), 0)) * d).reshape(x.shape)

    linear, head = GGUFLinear.__call__, GGUFEmbedding.as_linear
    monkeypatch.setattr(GGUFLinear, "__call__", lambda self, x: linear(self, rounded(x)))
    monkeypatch.setattr(GGUFEmbedding, "as_linear", lambda self, x: head(self, rounded(x)))
    close(got, _last_logits(exact, ids).astype(np.float64), rtol=1e-5)


@needs_kernels
@pytest.mark.slow
def test_real_model_int8_activations_close_to_exact(gemma_gguf: Path, monkeypatch: pytest.MonkeyPatch):
    """Gemma 3 270M with LMX_CPU_INT8=1: the next token and logits within a few percent of the exact kernels."""
    from test_real_model import PROMPTS

    exact = lmx.load(gemma_gguf, device="cpu", cpu_kernels=True)
    monkeypatch.setenv("LMX_CPU_INT8", "1")
    int8 = lmx.load(gemma_gguf, device="cpu", cpu_kernels=True)
    for prompt in PROMPTS[:4]:
        ids = int8.tokenizer.encode(prompt)
        logits = []
        for engine in (exact, int8):
            cache = engine.loaded.model.make_cache()
            engine.loaded.model(mx.array([ids[:-1]]), cache)
            logits.append(np.array(engine.loaded.model(mx.array([ids[-1:]]), cache)[0, -1]).astype(np.float64))
        want, got = logits
        assert got.argmax() == want.argmax(), prompt
        err = float(np.abs(got - want).max() / np.abs(want).max())
        assert 0 < err < 5e-2, f"{prompt!r}: int8 logits differ by {err:.2e} of the largest"

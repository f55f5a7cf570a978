"""Quantized KV cache (``kv_bits`` 8 and 4): attention over the quantized values, batching, the
prefix cache, sliding windows past their storage, memory accounting and bad values.

Two references, each independent of the code under test:

- *exact*: a float cache that stores ``mx.dequantize(mx.quantize(k))`` and attends with the float
  path. A quantized cache must give the same logits up to float32 rounding (atol 1e-4 on logits of
  magnitude ~3): attention over the quantized values is all it may change.
- *float*: the plain float cache. The quantization error itself: a value moves by at most half a
  step, (max - min) / (2^bits - 1) / 2 of its group of 64, about 0.2% of the group's range at 8
  bits and 3.3% at 4 bits. Through the 3-4 random layers of the tiny models, whose logits are
  far more sensitive than a trained model's, that was measured at 1.6-2.7% of the largest logit
  at 8 bits and 25-40% at 4 bits; the bounds below (5% and 60%) hold them with a margin and still
  fail for a wrong packing or a misplaced scale (errors of the logits' own size).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import lmx  # isort: skip
import mlx.core as mx
import numpy as np
import pytest

from lmx.errors import InvalidOptionError
from lmx.generate.step import prefill
from lmx.kernels import kernels
from lmx.loading import load_model
from lmx.models.cache import KVCache, KVQuant, RotatingKVCache, kv_quant
from lmx.runtime import memory
from lmx.runtime.ops import MLX_OPS, CpuKernelOps
from lmx.train.losses import token_losses

pytest_plugins = ["conftest_gguf"]

HEAD_DIM = 64  # the tiny models' 16 is below MLX's smallest quantization group (32)
FLOAT_BOUND = {8: 0.05, 4: 0.6}  # of max |logit|: see the module docstring
PROMPT = [5 + (i * 37) % 300 for i in range(40)]  # past the tiny Gemma's sliding window of 8


@pytest.fixture(scope="module")
def kv_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tiny_models import save_tiny

    out = {}
    for arch in ("gemma3", "qwen3"):
        d = tmp_path_factory.mktemp(f"kvq-{arch}")
        save_tiny(arch, d, head_dim=HEAD_DIM)
        out[arch] = d
    return out


@pytest.fixture(scope="module")
def models(kv_dirs: dict[str, Path]) -> dict:
    return {arch: load_model(d).model for arch, d in kv_dirs.items()}


def ops_backends() -> list:
    k = kernels()
    return [MLX_OPS] + ([CpuKernelOps(k)] if k is not None else [])


def fake_quantized(keys: mx.array, values: mx.array, quant: KVQuant) -> tuple[mx.array, mx.array]:
    g, b = quant.group_size, quant.bits
    keys = mx.dequantize(*mx.quantize(keys, group_size=g, bits=b), group_size=g, bits=b)
    values = mx.dequantize(*mx.quantize(values, group_size=g, bits=b), group_size=g, bits=b)
    return keys, values


class FakeQuantCache(KVCache):
    """The exact reference: a float cache holding the values a quantized cache holds."""

    def __init__(self, quant: KVQuant) -> None:
        super().__init__()
        self.fake = quant

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        return super().update_and_fetch(*fake_quantized(keys, values, self.fake))


class FakeQuantRotating(RotatingKVCache):
    def __init__(self, window: int, quant: KVQuant) -> None:
        super().__init__(window)
        self.fake = quant

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        return super().update_and_fetch(*fake_quantized(keys, values, self.fake))


def fake_caches(model, quant: KVQuant) -> list[KVCache]:
    return [
        FakeQuantRotating(c.window, quant) if isinstance(c, RotatingKVCache) else FakeQuantCache(quant)
        for c in model.make_cache()
    ]


def run(model, caches: list[KVCache], tokens: list[int], n_prefill: int, chunk: int = 16) -> list[np.ndarray]:
    """Logits after the prefill of ``tokens[:n_prefill]`` (in chunks) and after each later token."""
    ids = mx.array([tokens])
    out = [np.array(prefill(model, ids[:, :n_prefill], caches, step_size=chunk))]
    for i in range(n_prefill, len(tokens)):
        out.append(np.array(model(ids[:, i : i + 1], caches)[:, -1, :]))
    return out


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_cache_logits_equal_attention_over_the_quantized_values(models, arch: str, bits: int) -> None:
    model = models[arch]
    quant = kv_quant(bits, 64, HEAD_DIM)
    loaded_ops = model.ops
    try:
        for ops in ops_backends():
            model.set_ops(ops)
            got = run(model, model.make_cache(quant), PROMPT, 24)
            exact = run(model, fake_caches(model, quant), PROMPT, 24)
            floats = run(model, model.make_cache(), PROMPT, 24)
            top = max(np.abs(f).max() for f in floats)
            for g, e, f in zip(got, exact, floats):
                np.testing.assert_allclose(g, e, atol=1e-4, rtol=0, err_msg=f"{ops.name} {bits}-bit vs exact")
                assert np.abs(g - f).max() <= FLOAT_BOUND[bits] * top, f"{ops.name} {bits}-bit vs float"
    finally:
        model.set_ops(loaded_ops)


def test_four_bits_move_the_logits_more_than_eight(models, arch: str) -> None:
    model = models[arch]
    floats = run(model, model.make_cache(), PROMPT, 24)
    err = {}
    for bits in (8, 4):
        got = run(model, model.make_cache(kv_quant(bits, 64, HEAD_DIM)), PROMPT, 24)
        err[bits] = max(np.abs(g - f).max() for g, f in zip(got, floats))
    assert 0 < err[8] < err[4] / 4  # a 4-bit step is 17x an 8-bit one


def test_sliding_layers_past_their_storage(models) -> None:
    """300 positions: the tiny Gemma's rotating caches (window 8 + slack 256) wrap around.

    atol 5e-4: over 300 positions the two paths' float rounding (1e-6) now and then moves a key
    across a quantization boundary in one path and not the other (a step is ~1e-2 of the group's
    range), which moves a logit by ~1e-4."""
    model = models["gemma3"]
    tokens = [5 + (i * 53) % 300 for i in range(300)]
    quant = kv_quant(8, 64, HEAD_DIM)
    caches = model.make_cache(quant)
    got = run(model, caches, tokens, 280, chunk=128)
    exact = run(model, fake_caches(model, quant), tokens, 280, chunk=128)
    rotating = [c for c in caches if isinstance(c, RotatingKVCache)]
    assert rotating and all(c.offset - c.used > 0 for c in rotating)  # older positions were dropped
    for g, e in zip(got, exact):
        np.testing.assert_allclose(g, e, atol=5e-4, rtol=0)


def test_kernel_equals_mlx_over_dequantized_values() -> None:
    k = kernels()
    if k is None:
        pytest.skip("lmx's CPU kernels are not built")
    for bits, group, lq, causal in ((8, 64, 1, False), (4, 32, 3, True), (8, 128, 8, True), (4, 64, 2, False)):
        q = mx.random.normal((2, 4, lq, 128), key=mx.random.key(bits + lq))
        storage = mx.random.normal((2, 2, 50, 128), key=mx.random.key(7))  # 2 key heads serve 4 query heads
        kq = [a[:, :, 3:40] for a in mx.quantize(storage, group_size=group, bits=bits)]  # strided cache slices
        vq = [a[:, :, 3:40] for a in mx.quantize(storage * 0.5 + 1, group_size=group, bits=bits)]
        keys = mx.dequantize(*kq, group_size=group, bits=bits)
        values = mx.dequantize(*vq, group_size=group, bits=bits)
        want = mx.fast.scaled_dot_product_attention(q, keys, values, scale=0.1, mask="causal" if causal else None)
        got = k.quantized_attention(q, *kq, *vq, 0.1, causal, group, bits)
        np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-5, rtol=0)
        via_mlx = MLX_OPS.quantized_attention(q, tuple(kq), tuple(vq), 0.1, "causal" if causal else None, group, bits)
        np.testing.assert_allclose(np.array(via_mlx), np.array(want), atol=2e-5, rtol=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_kernel_from_each_row_s_first_key(bits: int) -> None:
    """Left-padded rows of a batch over a quantized cache (one query a row, from first[b]): bit for bit the
    row's value over its own keys alone, and MLX's masked attention over the dequantized values; on the model's
    seam too. Not float32: MLX's path with the equivalent mask."""
    k = kernels()
    if k is None:
        pytest.skip("lmx's CPU kernels are not built")
    q = mx.random.normal((3, 4, 1, 128), key=mx.random.key(bits))
    storage = mx.random.normal((3, 2, 60, 128), key=mx.random.key(9))
    kq = mx.quantize(storage, group_size=64, bits=bits)
    vq = mx.quantize(storage * 0.5 + 1, group_size=64, bits=bits)
    first = mx.array([0, 17, 59], dtype=mx.int32)
    got = k.quantized_attention_from(q, *kq, *vq, 0.1, first, 64, bits)
    for b, f in enumerate(first.tolist()):
        own = [a[b : b + 1, :, f:] for a in (*kq, *vq)]
        alone = k.quantized_attention(q[b : b + 1], *own, 0.1, False, 64, bits)
        assert mx.array_equal(got[b : b + 1], alone).item(), f"row {b}"
    mask = (mx.arange(60)[None] >= first[:, None])[:, None, None]
    keys, values = (mx.dequantize(*t, group_size=64, bits=bits) for t in (kq, vq))
    want = mx.fast.scaled_dot_product_attention(q, keys, values, scale=0.1, mask=mask)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-5, rtol=0)
    seam = CpuKernelOps(k).quantized_attention_from(q, tuple(kq), tuple(vq), 0.1, first, 64, bits)
    assert mx.array_equal(seam, got).item()
    via_mlx = MLX_OPS.quantized_attention_from(q, tuple(kq), tuple(vq), 0.1, first, 64, bits)
    np.testing.assert_allclose(np.array(via_mlx), np.array(want), atol=2e-5, rtol=0)
    other = k.quantized_attention_from(q.astype(mx.float16), *kq, *vq, 0.1, first, 64, bits)  # MLX's, masked
    np.testing.assert_allclose(np.array(other.astype(mx.float32)), np.array(want), atol=5e-3, rtol=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_mlx_path_in_bfloat16_stays_accurate(bits: int) -> None:
    """A GPU's dtype: the quantized products run in float32 (in bfloat16 MLX's CPU products were 20% off).
    atol 1e-2 on outputs of size ~1: bfloat16's rounding of the output (2^-8 relative) and of the queries."""
    q = mx.random.normal((2, 8, 1, 256), key=mx.random.key(1)).astype(mx.bfloat16)
    kv = mx.random.normal((2, 2, 700, 256), key=mx.random.key(2)).astype(mx.bfloat16)
    kq, vq = mx.quantize(kv, group_size=64, bits=bits), mx.quantize(kv * 0.5 + 1, group_size=64, bits=bits)
    keys = mx.dequantize(*kq, group_size=64, bits=bits).astype(mx.float32)
    values = mx.dequantize(*vq, group_size=64, bits=bits).astype(mx.float32)
    want = mx.fast.scaled_dot_product_attention(q.astype(mx.float32), keys, values, scale=0.0625)
    got = MLX_OPS.quantized_attention(q, tuple(kq), tuple(vq), 0.0625, None, 64, bits)
    assert got.dtype == mx.bfloat16
    np.testing.assert_allclose(np.array(got.astype(mx.float32)), np.array(want), atol=1e-2, rtol=0)


def test_eval_scores_what_the_quantized_cache_computes(models, arch: str) -> None:
    """``lmx eval --kv-bits``: a whole-sequence pass reads the values a quantized cache holds."""
    model = models[arch]
    quant = kv_quant(8, 64, HEAD_DIM)
    ids = mx.array([PROMPT])
    logits = model(ids[:, :-1], model.make_cache(quant))  # (1, L - 1, V) through a quantized cache, one chunk
    want = -mx.take_along_axis(logits - mx.logsumexp(logits, axis=-1, keepdims=True), ids[:, 1:, None], axis=-1)
    got = token_losses(model, ids[:, :-1], ids[:, 1:], quant)
    np.testing.assert_allclose(np.array(got), np.array(want[..., 0]), atol=1e-4, rtol=0)
    assert not np.allclose(np.array(got), np.array(token_losses(model, ids[:, :-1], ids[:, 1:])), atol=1e-6)


def test_quantized_cache_bytes_equal_the_computed_figure(models, arch: str) -> None:
    model = models[arch]
    args = model.args
    windows = [c.window for c in model.make_cache()]
    for bits, group in ((8, 64), (4, 32), (None, 64)):
        caches = model.make_cache(kv_quant(bits, group, HEAD_DIM))
        prefill(model, mx.array([PROMPT * 8]), caches, step_size=128)  # 320 positions
        mx.eval([c.state for c in caches])
        want = memory.kv_cache_bytes(windows, args.num_key_value_heads, HEAD_DIM, 320, 4, bits=bits, group_size=group)
        assert sum(c.nbytes for c in caches) == want
    row8 = memory.kv_row_bytes(HEAD_DIM, 4, 8, 64)
    assert row8 == HEAD_DIM + 2 * (HEAD_DIM // 64) * 4  # 1 byte a value, a float32 scale and bias a group


@pytest.fixture
def kv_engine(kv_dirs: dict[str, Path]) -> Iterator:
    made: list[lmx.Engine] = []

    def make(arch: str, **kwargs) -> lmx.Engine:
        engine = lmx.load(kv_dirs[arch], **kwargs)
        made.append(engine)
        return engine

    yield make
    for e in made:
        e.close()


NO_EOS = {1: -100.0, 2: -100.0, 6: -100.0}
TEXTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return",
    "Numbers 12345 and 67890, dates like 2026-11-27. Cafe, naive, emoji and CJK text. How are you today?",
]


@pytest.mark.parametrize("bits", [8, 4])
def test_rows_joining_and_leaving_a_quantized_batch_get_what_they_get_alone(kv_engine, arch: str, bits: int) -> None:
    engine = kv_engine(arch, kv_bits=bits, prompt_cache=False)
    long_opts = {"max_tokens": 60, "logit_bias": NO_EOS}
    alone_long = engine.generate(TEXTS[3], **long_opts)
    mixed = [
        (TEXTS[0], {"max_tokens": 12, "logit_bias": NO_EOS}),
        (TEXTS[1], {"max_tokens": 8, "temperature": 0.9, "seed": 7, "logit_bias": NO_EOS}),
        (TEXTS[2], {"max_tokens": 5, "logit_bias": NO_EOS}),
    ]
    alone = [engine.generate(p, **o) for p, o in mixed]
    before = engine.stats()
    running = engine.stream(TEXTS[3], **long_opts)
    got = [next(running) for _ in range(4)]
    results = [lmx.engine.collect(engine.stream(p, **o)) for p, o in mixed]  # join, then leave
    got += list(running)
    after = engine.stats()
    assert after.max_batch_seen >= 2 and after.batched_steps > before.batched_steps
    assert [t.id for t in got] == alone_long.tokens
    for r, a in zip(results, alone):
        assert r.tokens == a.tokens
        np.testing.assert_allclose(r.logprobs, a.logprobs, atol=1e-4, rtol=0)


def test_a_prefix_cache_hit_on_quantized_entries_gives_a_cold_prefill(kv_dirs: dict[str, Path], arch: str) -> None:
    """The reference prefills in chunks as long as the cached prefix, so both compute its keys in the
    same shapes: float rounding that differs (a 44- vs a 50-row product) can move a quantized value
    by a whole step, and the tiny models' nearly flat distributions then pick another token."""
    opts = {"max_tokens": 10, "logit_bias": NO_EOS}
    shared, longer = TEXTS[3], TEXTS[3] + " And more words here."
    with lmx.load(kv_dirs[arch], kv_bits=8) as warm, lmx.load(kv_dirs[arch], prompt_cache=True) as floats:
        for engine in (warm, floats):
            engine.generate(shared, **opts)
        hit = warm.generate(longer, **opts)
        floats.generate(longer, **opts)
        stats, f_stats = warm.stats().prefix, floats.stats().prefix
    assert stats.hits == 1 and stats.hit_tokens > 10 and hit.metrics.cached_tokens == stats.hit_tokens
    cold_engine = lmx.Engine(
        load_model(kv_dirs[arch]), prompt_cache=False, kv_bits=8, prefill_step_size=stats.hit_tokens
    )
    with cold_engine:
        want = cold_engine.generate(longer, **opts)
    assert hit.tokens == want.tokens
    np.testing.assert_allclose(hit.logprobs, want.logprobs, atol=1e-4, rtol=0)
    # The same entries hold 8-bit rows: their bytes are the float ones times the row sizes' ratio.
    assert f_stats.entries == stats.entries
    assert stats.bytes * memory.kv_row_bytes(HEAD_DIM, 4) == f_stats.bytes * memory.kv_row_bytes(HEAD_DIM, 4, 8, 64)


def test_info_and_admission_count_quantized_bytes(kv_engine) -> None:
    engine = kv_engine("gemma3", kv_bits=4, kv_group_size=32)
    info = engine.info()
    args = engine.model.args
    row = HEAD_DIM // 2 + 2 * (HEAD_DIM // 32) * 4
    assert (info.kv_bits, info.kv_group_size) == (4, 32)
    assert info.kv_bytes_per_token == 2 * args.num_hidden_layers * args.num_key_value_heads * row
    budget = engine.scheduler.kv_budget
    assert budget.bytes(300) == memory.kv_cache_bytes(
        [c.window for c in engine.model.make_cache()], args.num_key_value_heads, HEAD_DIM, 300, 4, bits=4, group_size=32
    )


def test_compiled_decode_falls_back_to_eager_for_quantized_caches(models) -> None:
    from lmx.generate.sampling import KeySequence, make_sampler
    from lmx.generate.step import generate_step

    model = models["qwen3"]
    quant = kv_quant(8, 64, HEAD_DIM)
    runs = []
    for compile_ in (True, False):
        steps = generate_step(
            model, mx.array([PROMPT]), model.make_cache(quant), make_sampler(0.0), KeySequence(0).next, compile=compile_
        )
        runs.append([int(next(steps)[0].item()) for _ in range(6)])
        steps.close()
    assert runs[0] == runs[1]


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"kv_bits": 3}, "kv_bits"),
        ({"kv_bits": 16}, "kv_bits"),
        ({"kv_bits": True}, "kv_bits"),
        ({"kv_bits": 8, "kv_group_size": 48}, "kv_group_size"),
    ],
)
def test_bad_values_are_typed_errors(kv_dirs: dict[str, Path], kwargs: dict, named: str) -> None:
    with pytest.raises(InvalidOptionError, match=named):
        lmx.load(kv_dirs["qwen3"], **kwargs)


def test_a_group_that_does_not_divide_the_head_is_refused(tiny_dirs: dict[str, Path]) -> None:
    with pytest.raises(InvalidOptionError, match="head_dim"):  # the stock tiny models' heads are 16 wide
        lmx.load(tiny_dirs["qwen3"], kv_bits=8)


def test_lmx_kv_bits_setting(kv_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMX_KV_BITS", "3")
    with pytest.raises(InvalidOptionError, match="LMX_KV_BITS"):
        lmx.load(kv_dirs["qwen3"])
    monkeypatch.setenv("LMX_KV_BITS", "8")
    with lmx.load(kv_dirs["qwen3"]) as engine:
        assert engine.info().kv_bits == 8


def test_real_270m_greedy_tokens_with_an_8_bit_cache(gemma_gguf: Path) -> None:
    """The real Gemma 3 270M: 8-bit keys and values keep its greedy continuation of a short prompt."""
    prompt = "The capital of France is Paris. The capital of Germany is"
    with lmx.load(gemma_gguf) as engine:
        want = engine.generate(prompt, max_tokens=24)
    with lmx.load(gemma_gguf, kv_bits=8) as engine:
        got = engine.generate(prompt, max_tokens=24)
        assert engine.info().kv_bits == 8
    assert got.tokens == want.tokens, (got.text, want.text)


def test_segmented_decode_over_quantized_caches_equals_the_eager_step(kv_engine, arch: str) -> None:
    """The GPU's decode step (compiled segments around eager attention), run here on the CPU."""
    import dataclasses

    from lmx.generate.step import Decoder, DecodeState

    opts = {"max_tokens": 16, "logit_bias": NO_EOS}
    results = []
    for mode in ("eager", "segmented"):
        engine = kv_engine(arch, kv_bits=8, prompt_cache=False)
        plan = dataclasses.replace(engine.loaded.profile, decode_mode=mode)
        engine.scheduler.decoder = Decoder(DecodeState(engine.model, plan))
        streams = []
        for p in TEXTS:
            streams.append(engine.stream(p, **opts))
            next(streams[-1])  # each joins while the others run: padded rows
        for s in streams:
            list(s)
        results.append([s.tokens for s in streams])
    assert results[0] == results[1]


def test_kv_bits_flag_on_every_command_that_runs_a_model() -> None:
    from lmx.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("serve", "generate", "chat", "bench", "eval", "info"):
        assert "--kv-bits" in sub.choices[name]._option_string_actions, name


def test_serve_loads_with_its_kv_bits(kv_dirs: dict[str, Path]) -> None:
    from lmx.server import ServerSettings, create_app

    app = create_app(ServerSettings(model=str(kv_dirs["qwen3"]), kv_bits=4, warm_up=False))
    try:
        assert app.state.lmx.info.kv_bits == 4
        assert app.state.lmx.engine.scheduler.kv_quant == KVQuant(4, 64)
    finally:
        app.state.lmx.engine.close()
    with pytest.raises(InvalidOptionError, match="kv_bits"):
        create_app(ServerSettings(model=str(kv_dirs["qwen3"]), kv_bits=3, warm_up=False))


def test_lmx_bench_reports_the_quantized_cache(kv_dirs: dict[str, Path]) -> None:
    import json
    import os
    import subprocess
    import sys

    args = ["bench", "--model", str(kv_dirs["gemma3"]), "--prompt-tokens", "300", "--gen-tokens", "4"]
    args += ["--repeat", "1", "--kv-bits", "8", "--json"]
    out = subprocess.run([sys.executable, "-m", "lmx.cli.main", *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    model = load_model(kv_dirs["gemma3"]).model
    args_ = model.args
    windows = [c.window for c in model.make_cache()]
    want = memory.kv_cache_bytes(windows, args_.num_key_value_heads, HEAD_DIM, 303, 4, bits=8, group_size=64)
    assert (data["kv_bits"], data["kv_cache_bytes"]) == (8, want)  # 300 prompt + 3 decoded positions
    bad = subprocess.run(
        [sys.executable, "-m", "lmx.cli.main", *args[:-3], "--kv-bits", "3"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ},
    )
    assert bad.returncode != 0 and "kv_bits must be one of 8, 4" in bad.stderr

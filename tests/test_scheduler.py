"""The scheduler: continuous batching, per-row options, the prefix cache, admission by memory.

Every request runs as a row of one decode loop; these tests check that where a row runs
(alone, joining mid-flight, beside rows with other options, after a prefix-cache hit) changes
nothing but float rounding: greedy and seeded tokens are equal, logprobs close.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import lmx  # isort: skip
import mlx.core as mx
import numpy as np
import pytest

from lmx.errors import OutOfMemoryError
from lmx.runtime import memory

PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return",
    "Numbers 12345 and 67890, dates like 2026-11-27. Cafe, naive, emoji and CJK text. How are you today?",
]
NO_EOS = {1: -100.0, 2: -100.0, 6: -100.0, 106: -100.0}  # tiny vocabularies: keep rows running


@pytest.fixture
def cold(tiny_dirs: dict[str, Path]) -> Iterator[Callable[[str], lmx.Engine]]:
    """Fresh engines without a prefix cache: every row is prefilled from nothing."""
    made: list[lmx.Engine] = []

    def make(arch: str, **kwargs) -> lmx.Engine:
        engine = lmx.load(tiny_dirs[arch], prompt_cache=False, **kwargs)
        made.append(engine)
        return engine

    yield make
    for e in made:
        e.close()


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def test_a_request_joining_a_running_batch_gets_what_it_gets_alone(cold, arch: str) -> None:
    engine = cold(arch)
    long_opts = {"max_tokens": 300, "logit_bias": NO_EOS}
    alone_long = engine.generate(PROMPTS[3], **long_opts)
    mixed = [
        (PROMPTS[0], {"max_tokens": 20}),
        (PROMPTS[1], {"max_tokens": 15, "temperature": 0.9, "top_p": 0.8, "seed": 7}),
        (PROMPTS[2], {"max_tokens": 12, "temperature": 1.2, "top_k": 5, "seed": 11, "repetition_penalty": 1.3}),
    ]
    alone = [engine.generate(p, **o) for p, o in mixed]
    before = engine.stats()
    running = engine.stream(PROMPTS[3], **long_opts)
    got = [next(running) for _ in range(5)]  # the long row is decoding...
    joined = [engine.stream(p, **o) for p, o in mixed]  # ...when these join it, one by one
    results = [lmx.engine.collect(s) for s in joined]
    got += list(running)
    after = engine.stats()
    assert after.batched_steps > before.batched_steps and after.max_batch_seen >= 2
    assert [t.id for t in got] == alone_long.tokens
    for r, a in zip(results, alone):
        assert (r.tokens, r.text, r.finish_reason) == (a.tokens, a.text, a.finish_reason)
        np.testing.assert_allclose(r.logprobs, a.logprobs, atol=1e-4, rtol=0)


def test_rows_prefilled_together_equal_alone(cold, arch: str) -> None:
    engine = cold(arch)
    alone = [engine.generate(p, max_tokens=10, logprobs=2) for p in PROMPTS]
    batch = engine.batch_generate(PROMPTS, max_tokens=10, logprobs=2)
    for b, a in zip(batch, alone):
        assert (b.tokens, b.text) == (a.tokens, a.text)
        np.testing.assert_allclose(b.logprobs, a.logprobs, atol=1e-4, rtol=0)
        assert [t for t, _ in b.top_logprobs[0]] == [t for t, _ in a.top_logprobs[0]]


def test_rows_past_the_sliding_window_at_different_positions(cold) -> None:
    engine = cold("gemma3")  # sliding window 8: every prompt here is longer
    prompts = [PROMPTS[3] * 3, PROMPTS[1], PROMPTS[3] + PROMPTS[1] * 2]
    opts = {"max_tokens": 40, "logit_bias": NO_EOS}
    alone = [engine.generate(p, **opts) for p in prompts]
    streams = []
    for p in prompts:  # each joins while the others are at other positions
        streams.append(engine.stream(p, **opts))
        next(streams[-1])
    for s in streams:
        list(s)
    assert [s.tokens for s in streams] == [a.tokens for a in alone]


def test_a_cancelled_row_leaves_at_once_and_frees_its_memory(cold) -> None:
    engine = cold("qwen3")
    opts = {"max_tokens": 400, "logit_bias": NO_EOS}
    alone = engine.generate(PROMPTS[1], **opts)
    a, b = engine.stream(PROMPTS[0], **opts), engine.stream(PROMPTS[1], **opts)
    next(a), next(b)
    wait_until(lambda: engine.stats().max_batch_seen == 2)
    a.close()
    assert a.finish_reason == "cancelled"
    wait_until(lambda: engine.stats().running == 1)
    assert [t.id for t in b] == alone.tokens[1:]
    stats = engine.stats()
    assert (stats.running, stats.cancelled, stats.kv_bytes) == (0, 1, 0)


def test_a_prefix_cache_hit_gives_the_logits_of_a_cold_prefill(tiny_dirs: dict[str, Path], cold, arch: str) -> None:
    system = "You are a careful assistant. " * 6
    with lmx.load(tiny_dirs[arch]) as warm:
        warm.generate(system + "First question?", max_tokens=3)
        hit = warm.generate(system + "Second question, longer?", max_tokens=6, logprobs=5)
        assert hit.metrics.cached_tokens >= len(warm.tokenizer.encode(system)) - 1
        assert warm.stats().prefix.hits >= 1
    miss = cold(arch).generate(system + "Second question, longer?", max_tokens=6, logprobs=5)
    assert miss.metrics.cached_tokens == 0
    assert hit.tokens == miss.tokens
    for h, m in zip(hit.top_logprobs, miss.top_logprobs):
        assert [t for t, _ in h] == [t for t, _ in m]
        np.testing.assert_allclose([v for _, v in h], [v for _, v in m], atol=1e-5, rtol=0)


def test_a_shared_prefix_keeps_working_after_its_first_owner_went_on(tiny_dirs: dict[str, Path]) -> None:
    # The entry stored at the end of the first prompt's prefill must not see the tokens that
    # request generated afterwards in its own cache.
    with lmx.load(tiny_dirs["gemma3"]) as engine:
        first = engine.stream("Shared start of a prompt, then", max_tokens=30, logit_bias=NO_EOS)
        next(first)
        second = engine.generate("Shared start of a prompt, then something else", max_tokens=8)
        list(first)
    with lmx.load(tiny_dirs["gemma3"], prompt_cache=False) as cold_engine:
        assert cold_engine.generate("Shared start of a prompt, then something else", max_tokens=8).tokens == (
            second.tokens
        )


def test_admission_waits_for_memory_instead_of_failing(cold) -> None:
    engine = cold("gemma3")
    opts = {"max_tokens": 200, "logit_bias": NO_EOS}
    alone = [engine.generate(p, **opts).tokens for p in PROMPTS[:3]]
    args = engine.model.args
    windows = [args.sliding_window if t == "sliding_attention" else None for t in args.layer_types]
    one = memory.kv_cache_bytes(windows, args.num_key_value_heads, args.head_dim, 240, 4)
    previous = memory.stats().limit
    memory.set_limit(memory.active() + int(2.5 * one))  # one row fits with room to spare, never two
    try:
        streams = [engine.stream(p, **opts) for p in PROMPTS[:3]]
        assert [[t.id for t in s] for s in streams] == alone
        assert engine.stats().max_batch_seen == 1  # they queued, one after the other
        memory.set_limit(memory.active() + one // 2)
        with pytest.raises(OutOfMemoryError, match=r"KV cache for \d+ positions .*lower max_tokens"):
            engine.generate(PROMPTS[0], **opts)  # could never fit, even alone: refused at once
    finally:
        memory.set_limit(previous)


def test_nested_streams_in_one_thread_both_run(engines: dict[str, lmx.Engine]) -> None:
    engine = engines["gemma3"]
    expected = [engine.generate(p, max_tokens=6).tokens for p in PROMPTS[:2]]
    outer = engine.stream(PROMPTS[0], max_tokens=6)
    first = next(outer)
    inner = engine.generate(PROMPTS[1], max_tokens=6)  # no deadlock: it is one more row
    assert [first.id, *(t.id for t in outer)] == expected[0]
    assert inner.tokens == expected[1]


def test_close_ends_open_streams_as_cancelled(tiny_dirs: dict[str, Path]) -> None:
    engine = lmx.load(tiny_dirs["gemma3"])
    with engine:
        stream = engine.stream(PROMPTS[0], max_tokens=500, logit_bias=NO_EOS)
        next(stream)
        # leaving the with block closes the engine while the stream is open on this thread
    rest = list(stream)
    assert stream.finish_reason == "cancelled" and len(rest) < 499
    with pytest.raises(lmx.errors.EngineClosedError):
        engine.generate("x")


EXIT_SCRIPT = """
import sys
import lmx
engine = lmx.load(sys.argv[1])
engine.generate("Hello", max_tokens=3)
if sys.argv[2] == "open-stream":
    stream = engine.stream("Hello", max_tokens=500)
    next(stream)
if sys.argv[2] == "raise":
    raise SystemExit(3)
"""


@pytest.mark.parametrize("ending", ["plain", "open-stream", "raise"])
def test_a_program_that_never_closes_its_engine_exits_cleanly(tiny_dirs: dict[str, Path], ending: str) -> None:
    # The engine's worker used to be woken by the engine's finaliser during interpreter shutdown
    # and end the process with SIGABRT ("terminate called without an active exception", rc 134).
    for _ in range(2):  # it was a race: twice each
        done = subprocess.run(
            [sys.executable, "-c", EXIT_SCRIPT, str(tiny_dirs["gemma3"]), ending],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == (3 if ending == "raise" else 0), done.stderr[-2000:]
        assert "terminate called" not in done.stderr


def test_a_stream_closed_early_is_cancelled(engines: dict[str, lmx.Engine]) -> None:
    engine = engines["gemma3"]
    stream = engine.stream(PROMPTS[1], max_tokens=100, logit_bias=NO_EOS)
    next(stream)
    stream.close()
    assert stream.finish_reason == "cancelled"
    assert len(engine.generate(PROMPTS[1], max_tokens=3).tokens) == 3


def test_segmented_decode_of_padded_rows_equals_the_eager_step(cold, arch: str) -> None:
    # The GPU's decode step (compiled segments around eager attention), run here on the CPU:
    # rows that joined at different times (left padding) get what the eager step gives them.
    import dataclasses

    from lmx.generate.step import Decoder, DecodeState

    opts = {"max_tokens": 24, "logit_bias": NO_EOS}
    results = []
    for mode in ("eager", "segmented"):
        engine = cold(arch)
        plan = dataclasses.replace(engine.loaded.profile, decode_mode=mode)
        engine.scheduler.decoder = Decoder(DecodeState(engine.model, plan))
        streams = []
        for p in PROMPTS:
            streams.append(engine.stream(p, **opts))
            next(streams[-1])  # each joins while the others run: padded rows
        for s in streams:
            list(s)
        results.append([s.tokens for s in streams])
        assert engine.stats().batched_steps > 0
    assert results[0] == results[1]


def test_prefix_cache_finds_the_longest_usable_prefix_among_many_entries() -> None:
    import mlx.core as mx

    from lmx.models.cache import KVCache
    from lmx.scheduler import PrefixCache

    def caches_for(n: int) -> list[KVCache]:
        c = KVCache()
        c.update_and_fetch(mx.zeros((1, 1, n, 4)), mx.zeros((1, 1, n, 4)))
        return [c]

    cache = PrefixCache(max_bytes=1 << 30)
    prompts = [[i, i + 1, *range(100, 140), i] for i in range(200)]  # 200 entries, distinct first tokens
    for ids in prompts:
        cache.store(ids, caches_for(len(ids)))
    assert cache.stats().entries == 200
    got, n = cache.lookup([*prompts[150][:30], 999, 998])
    assert n == 30 and got is not None and got[0].offset == 30
    assert cache.lookup([5000, 5001, 5002, 5003, 5004, 5005, 5006, 5007, 5008])[1] == 0
    cache.evict(0)
    assert cache.stats().entries == 0 and cache.lookup(prompts[3])[1] == 0


def test_one_set_of_rules_for_options(engines: dict[str, lmx.Engine]) -> None:
    from lmx.errors import InvalidOptionError

    engine = engines["gemma3"]
    with pytest.raises(
        InvalidOptionError, match=r"classify\(\) got an unknown option 'temprature'.*allowed: instruction"
    ):
        engine.classify(["a text"], ["x", "y"], temprature=1)
    with pytest.raises(
        InvalidOptionError, match=r"classify\(\) got an unknown option 'batchsize'; did you mean 'batch_size'"
    ):
        engine.classify(["a text"], ["x", "y"], batchsize=2)
    with pytest.raises(InvalidOptionError, match="prompts must be a list of prompts.*got str"):
        engine.batch_generate("abc", max_tokens=2)
    assert len(engine.generate("abc", max_tokens=2).tokens) == 2  # the engine is unchanged


class _FirstKeyOps:
    """MLX's ops taking padded rows' one-query attention by each row's first key, as the CUDA
    profile does (there one kernel; here :meth:`MlxOps.attention_from`'s mask), counting calls."""

    def __init__(self) -> None:
        from lmx.runtime.ops import MlxOps

        class Ops(MlxOps):
            indexes_padding = True
            calls = 0

            def attention_from(self, q, k, v, scale, first):
                Ops.calls += 1
                return super().attention_from(q, k, v, scale, first)

        self.ops = Ops()


@pytest.mark.parametrize("mode", ["eager", "segmented"])
def test_padded_rows_attending_from_their_first_key_equal_alone(cold, mode: str) -> None:
    # Rows past Gemma's sliding window (8) at different positions, joined at different times: each
    # row's first visible key (its own start, or the window's) must be what the mask array says.
    import dataclasses

    from lmx.generate.step import Decoder, DecodeState

    engine = cold("gemma3")
    first_key = _FirstKeyOps().ops
    engine.model.set_ops(first_key)
    plan = dataclasses.replace(engine.loaded.profile, decode_mode=mode)
    engine.scheduler.decoder = Decoder(DecodeState(engine.model, plan))
    prompts = [PROMPTS[3] * 3, PROMPTS[1], PROMPTS[0], PROMPTS[3] + PROMPTS[1] * 2]
    opts = {"max_tokens": 40, "logit_bias": NO_EOS, "logprobs": 1}
    alone = [engine.generate(p, **opts) for p in prompts]
    assert type(first_key).calls == 0  # a lone row is not padded
    streams = []
    for p in prompts:  # each joins while the others are at other positions
        streams.append(engine.stream(p, **opts))
        next(streams[-1])
    results = [lmx.engine.collect(s) for s in streams]
    assert type(first_key).calls > 0
    for r, a in zip(results, alone):
        assert r.tokens == a.tokens
        np.testing.assert_allclose(r.logprobs, a.logprobs[1:], atol=1e-4, rtol=0)  # (the first was read above)


@pytest.mark.parametrize("window", [None, 5])
def test_first_keys_is_the_one_query_mask_as_an_index(window) -> None:
    from lmx.models.cache import KVCache, RotatingKVCache, build_mask

    rng = np.random.default_rng(0)
    for trial in range(20):
        cache = KVCache() if window is None else RotatingKVCache(window, slack=4)
        batch, steps = 3, int(rng.integers(1, 30))
        pad = mx.array(rng.integers(0, steps, batch), dtype=mx.int32)
        for _ in range(steps):
            kv = mx.zeros((batch, 1, 1, 8))
            keys, _ = cache.update_and_fetch(kv, kv)
        n_keys = keys.shape[2]
        mask = build_mask(1, n_keys, cache.offset, cache.window, pad)
        mask = (
            np.ones((batch, n_keys), bool)
            if mask is None
            else np.broadcast_to(np.array(mask)[:, 0, 0], (batch, n_keys))
        )
        first = np.array(cache.first_keys(n_keys, pad))
        expected = np.arange(n_keys)[None] >= first[:, None]
        assert (mask == expected).all(), (trial, steps, np.array(pad), first)

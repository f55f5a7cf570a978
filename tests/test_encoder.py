"""Decode steps queued by a thread of their own (:mod:`lmx.generate.encoder`, the plan's
``encode_thread``) compute what the one-thread loop computes.

``LMX_ENCODE_THREAD=on`` turns it on; here the plan forces it on the CPU, where the two threads
keep the same ordering rules as on a GPU.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import lmx  # isort: skip
import mlx.core as mx
import numpy as np
import pytest

from decode_runs import first_steps
from lmx import bench
from lmx.errors import InvalidOptionError
from lmx.generate.encoder import StepEncoder
from lmx.generate.step import DecodeState
from lmx.models import build_model
from lmx.runtime.profile import StepPlan


def run(model, prompt, n, plan, *, temperature=0.0, processors=(), cache=None):
    state = DecodeState(model, plan)
    tokens, logprobs = first_steps(
        model, prompt, n, cache=cache, temperature=temperature, seed=7, processors=processors, state=state
    )
    return tokens, logprobs, state


@pytest.fixture(scope="module", params=["tiny-gemma3", "tiny-qwen3"])
def model(request):
    m = build_model(bench.config_for(request.param))
    bench.random_weights(m, mx.float32, seed=4)
    mx.eval(m.parameters())
    return m


@pytest.mark.parametrize("mode", ["eager", "segmented", "compiled"])
def test_threaded_steps_equal_one_thread_bit_for_bit(model, mode):
    # 300 steps: past the first KV-cache growth (256) and Gemma's sliding-window wraps.
    prompt = mx.random.randint(0, 512, (2, 20), key=mx.random.key(5))
    one = run(model, prompt, 300, StepPlan(decode_mode=mode))
    two = run(model, prompt, 300, StepPlan(decode_mode=mode, encode_thread=True))
    assert two[2]._encoder is not None  # the encoder did run
    assert two[0] == one[0]
    np.testing.assert_array_equal(two[1], one[1])


def test_threaded_sampling_and_processors_follow_the_same_keys(model):
    # a temperature draws with the per-step keys; a processor reads the history the loop keeps
    def no_repeat_last(history, logits):
        last = history[:, -1:]
        return mx.put_along_axis(logits, last, mx.array(-mx.inf, dtype=logits.dtype), axis=-1)

    prompt = mx.random.randint(0, 512, (1, 12), key=mx.random.key(6))
    kw = {"temperature": 0.8, "processors": [no_repeat_last]}
    one = run(model, prompt, 40, StepPlan(decode_mode="segmented"), **kw)
    two = run(model, prompt, 40, StepPlan(decode_mode="segmented", encode_thread=True), **kw)
    assert two[0] == one[0]
    assert all(a != b for (a,), (b,) in zip(two[0], two[0][1:]))  # the processor did act
    np.testing.assert_array_equal(two[1], one[1])


def test_a_closed_threaded_generation_leaves_the_cache_as_the_one_thread_loop_does(model):
    # the generator's last queued step runs before it ends: the cache then goes on as usual
    prompt = mx.random.randint(0, 512, (1, 16), key=mx.random.key(8))
    caches = []
    for thread in (False, True):
        cache = model.make_cache()
        run(model, prompt, 9, StepPlan(decode_mode="segmented", encode_thread=thread), cache=cache)
        caches.append(cache)
    one, two = caches
    assert [c.offset for c in two] == [c.offset for c in one]
    for a, b in zip(one, two):
        np.testing.assert_array_equal(np.array(b.state[0]), np.array(a.state[0]))
    # and a second generation continues from it alike
    nxt = mx.array([[5, 6, 7]])
    assert run(model, nxt, 6, StepPlan(), cache=two)[0] == run(model, nxt, 6, StepPlan(), cache=one)[0]


def test_an_error_in_the_encoder_reaches_the_caller():
    # an array that escaped a compiled function's trace has no way to be computed: MLX refuses to
    # queue it, in the encoder's thread; the caller's wait raises that error
    escaped = []

    def f(x):
        escaped.append(x * 2)
        return x + 1

    mx.eval(mx.compile(f)(mx.ones(2)))
    encoder = StepEncoder(mx.cpu)
    queued = encoder.submit(escaped[0])
    with pytest.raises(RuntimeError, match="without a primitive"):
        queued.wait()
    with mx.stream(encoder.stream):
        fine = mx.ones(3) * 2
    encoder.submit(fine).wait()  # the thread goes on
    assert fine.tolist() == [2.0, 2.0, 2.0]
    encoder.close()
    encoder.close()  # twice is fine


def test_a_process_with_a_live_encoder_exits_cleanly():
    # MLX's per-thread state must be torn down by the encoder's own thread before the interpreter
    # ends (left to the process's end it aborted: "terminate called without an active exception")
    code = textwrap.dedent(
        """
        import mlx.core as mx
        from lmx import bench
        from lmx.generate.sampling import KeySequence, make_sampler
        from lmx.generate.step import DecodeState, generate_step
        from lmx.models import build_model
        from lmx.runtime.profile import StepPlan
        m = build_model(bench.config_for("tiny-qwen3"))
        bench.random_weights(m, mx.float32, seed=1)
        state = DecodeState(m, StepPlan(decode_mode="segmented", encode_thread=True))
        g = generate_step(m, mx.array([[2, 3, 4]]), m.make_cache(), make_sampler(0.0), KeySequence(0).next, state=state)
        for i, (t, _) in enumerate(g):
            t.tolist()
            if i == 4:
                break
        g.close()
        print("done")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "done"
    assert "terminate" not in out.stderr


def serve_mixed(engine):
    """A lone request; a long row with three rows joining it (seeded sampling, top log-probs, a stop
    string); the first prompt again (a prefix-cache hit). Returns (alone, batched): what each got,
    as (ids, log-probs, text, finish reason, top log-probs)."""

    def got(r):
        return r.tokens, r.logprobs, r.text, r.finish_reason, r.top_logprobs

    no_eos = {1: -100.0, 2: -100.0, 6: -100.0, 106: -100.0}
    first = engine.generate("Hello", max_tokens=20, logprobs=3)
    running = engine.stream("Numbers 12345 and 67890, dates like 2026-11-27.", max_tokens=120, logit_bias=no_eos)
    long = [next(running) for _ in range(4)]
    joined = [
        engine.stream("Hello", max_tokens=20, logprobs=3),
        engine.stream("The quick brown fox", max_tokens=15, temperature=0.9, top_p=0.8, seed=7),
        engine.stream("def add(a, b):", max_tokens=30, temperature=1.2, seed=11, stop=["e"]),
    ]
    batched = [got(lmx.engine.collect(s)) for s in joined]
    long += list(running)
    batched.insert(0, ([t.id for t in long], [t.logprob for t in long], None, None, None))
    again = engine.generate("Hello", max_tokens=20, logprobs=3)
    return [got(first), got(again)], batched


@pytest.mark.parametrize("arch", ["gemma3", "qwen3"])
def test_the_engine_with_the_thread_serves_what_it_serves_without(tiny_dirs, monkeypatch, arch):
    # the scheduler's path: joins, leaves, seeded rows, top log-probs, a stop, a cache hit
    with lmx.load(tiny_dirs[arch]) as engine:
        plain_alone, plain_batched = serve_mixed(engine)
    monkeypatch.setenv("LMX_ENCODE_THREAD", "on")
    with lmx.load(tiny_dirs[arch]) as engine:
        encoder = engine.scheduler._encoder
        assert encoder is not None
        alone, batched = serve_mixed(engine)
        assert encoder.submitted > 100  # the steps did go through it
    assert alone == plain_alone  # a request alone: bit for bit
    # Rows that join a running batch join at whatever step the timing gives (with or without the
    # thread), and a row's values depend on its place in the batch by float rounding only
    # (tests/test_scheduler.py): the same tokens, text and ends, log-probs within that rounding.
    for (ids, lps, text, end, top), (p_ids, p_lps, p_text, p_end, p_top) in zip(batched, plain_batched):
        assert (ids, text, end) == (p_ids, p_text, p_end)
        np.testing.assert_allclose(lps, p_lps, atol=1e-4, rtol=0)
        assert (top is None) == (p_top is None)
        for step, p_step in zip(top or [], p_top or []):
            assert [i for i, _ in step] == [i for i, _ in p_step]
            np.testing.assert_allclose([v for _, v in step], [v for _, v in p_step], atol=1e-4, rtol=0)


def test_the_setting_turns_the_thread_on(monkeypatch):
    from lmx.loading.loader import load_profile

    assert not load_profile("auto").encode_thread  # auto on the CPU: off (a step is bound by arithmetic)
    monkeypatch.setenv("LMX_ENCODE_THREAD", "on")
    assert load_profile("auto").encode_thread
    assert load_profile("auto").as_dict()["encode_thread"] is True
    monkeypatch.setenv("LMX_ENCODE_THREAD", "sometimes")
    with pytest.raises(InvalidOptionError, match="LMX_ENCODE_THREAD"):
        load_profile("auto")


def test_auto_is_on_where_it_was_measured_to_pay():
    from lmx.runtime.profile import choose_profile

    assert choose_profile("gpu", backend="cuda").encode_thread
    assert "steps queued on a thread of their own" in str(choose_profile("gpu", backend="cuda"))
    assert not choose_profile("gpu", backend="metal").encode_thread  # not measured there
    assert not choose_profile("cpu").encode_thread
    assert not choose_profile("gpu", backend="cuda", encode_thread=False).encode_thread  # LMX_ENCODE_THREAD=off
    assert choose_profile("cpu", encode_thread=True).encode_thread  # LMX_ENCODE_THREAD=on


def test_the_loader_maps_the_setting_on_a_cuda_gpu(monkeypatch):
    """What the loader decides where the thread's default is on (a CUDA GPU, named here: this
    machine has none; the profile is only chosen, nothing runs on it)."""
    from lmx.loading import loader

    monkeypatch.setattr(loader, "device_name", lambda: "gpu")
    monkeypatch.setattr(loader, "backend_name", lambda: "cuda")
    for value, expected in (("auto", True), ("off", False), ("on", True)):
        monkeypatch.setenv("LMX_ENCODE_THREAD", value)
        assert loader.load_profile("auto").encode_thread is expected, value

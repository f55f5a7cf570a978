"""The Engine API on tiny random models: equal to transformers, streaming, stops, cache reuse."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import lmx  # isort: skip
import mlx.core as mx

from lmx.errors import ContextLengthError, EngineClosedError, InvalidOptionError

PROMPT = "Hello world! How are you"


def test_greedy_32_tokens_equal_transformers_generate(arch, engines, references):
    engine = engines[arch]
    ids = engine.tokenizer.encode(PROMPT)
    eos = sorted(engine.tokenizer.eos_token_ids)
    with torch.no_grad():
        out = references[arch].generate(
            torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=eos, pad_token_id=0
        )
    expected = out[0, len(ids) :].tolist()
    result = engine.generate(PROMPT, max_tokens=32)
    assert result.tokens == expected
    assert result.finish_reason == ("stop" if expected[-1] in eos else "length")
    assert result.text == engine.tokenizer.decode([t for t in expected if t not in eos])


def test_stream_equals_generate(arch, engines):
    engine = engines[arch]
    full = engine.generate(PROMPT, max_tokens=24)
    stream = engine.stream(PROMPT, max_tokens=24)
    pieces = [t.text for t in stream]
    assert "".join(pieces) == full.text == stream.text
    assert stream.tokens == full.tokens and stream.finish_reason == full.finish_reason
    assert stream.metrics.generated_tokens == len(full.tokens)
    assert stream.metrics.prompt_tokens == len(engine.tokenizer.encode(PROMPT))


def test_logprobs_equal_an_independent_forward_pass(engines):
    engine = engines["qwen3"]
    result = engine.generate(PROMPT, max_tokens=6, logprobs=3)
    ids = engine.tokenizer.encode(PROMPT) + result.tokens
    logits = np.array(engine.model(mx.array([ids]))[0], dtype=np.float64)
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    n = len(engine.tokenizer.encode(PROMPT))
    for i, tok in enumerate(result.tokens):
        row = logp[n - 1 + i]
        assert result.logprobs[i] == pytest.approx(row[tok], abs=1e-4)
        top = result.top_logprobs[i]
        assert [t for t, _ in top] == list(np.argsort(-row)[:3])
        assert top[0][0] == tok  # greedy picks the most likely token


def test_stop_string_cuts_text_and_reports_stop(engines):
    engine = engines["gemma3"]
    free = engine.generate(PROMPT, max_tokens=30)
    assert len(free.text) > 12
    stop = free.text[8:12]
    cut = engine.generate(PROMPT, max_tokens=30, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[: free.text.index(stop)]
    streamed = "".join(t.text for t in engine.stream(PROMPT, max_tokens=30, stop=stop))
    assert streamed == cut.text


def test_stop_token_id_and_max_tokens(engines):
    engine = engines["qwen3"]
    free = engine.generate(PROMPT, max_tokens=20)
    assert free.finish_reason == "length" and len(free.tokens) == 20
    stop_id = free.tokens[5]
    cut = engine.generate(PROMPT, max_tokens=20, stop=[stop_id])
    first = free.tokens.index(stop_id)
    assert cut.tokens == free.tokens[: first + 1] and cut.finish_reason == "stop"
    assert cut.text == engine.tokenizer.decode(free.tokens[:first])


def test_prompt_prefix_is_reused_and_results_unchanged(arch, tiny_dirs, engines):
    engine = engines[arch]
    fresh = lmx.load(tiny_dirs[arch], prompt_cache=False)
    try:
        first = engine.generate(PROMPT, max_tokens=10)
        follow = PROMPT + first.text + " and then more words"
        again = engine.generate(follow, max_tokens=10)
        assert again.metrics.cached_tokens > len(engine.tokenizer.encode(PROMPT)) - 1
        assert again.tokens == fresh.generate(follow, max_tokens=10).tokens
        assert fresh.generate(follow, max_tokens=10).metrics.cached_tokens == 0
    finally:
        fresh.close()


def test_chat_follow_up_prefills_only_new_tokens(arch, tiny_dirs, engines):
    engine = engines[arch]
    fresh = lmx.load(tiny_dirs[arch], prompt_cache=False)
    try:
        messages = [{"role": "user", "content": "Hello there"}]
        reply = engine.chat(messages, max_tokens=8)
        messages += [{"role": "assistant", "content": reply.text}, {"role": "user", "content": "And more?"}]
        second = engine.chat(messages, max_tokens=8)
        assert second.metrics.cached_tokens >= len(engine.tokenizer.encode_chat(messages[:1]))
        assert second.tokens == fresh.chat(messages, max_tokens=8).tokens
    finally:
        fresh.close()


def test_seeded_sampling_is_reproducible(engines):
    engine = engines["qwen3"]
    a = engine.generate(PROMPT, max_tokens=16, temperature=1.0, seed=7)
    b = engine.generate(PROMPT, max_tokens=16, temperature=1.0, seed=7)
    c = engine.generate(PROMPT, max_tokens=16, temperature=1.0, seed=8)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temprature": 1}, "temprature"),
        ({"top_k": float("nan")}, "top_k"),
        ({"logit_bias": {999: 1.0}}, "logit_bias"),
    ],
)
def test_invalid_options_are_rejected_and_engine_stays_usable(engines, options, name):
    engine = engines["gemma3"]
    with pytest.raises(InvalidOptionError, match=name):
        engine.generate(PROMPT, **options)
    assert len(engine.generate(PROMPT, max_tokens=3).tokens) == 3


def test_bad_prompts(engines):
    engine = engines["qwen3"]  # no BOS: an empty string has no tokens
    with pytest.raises(InvalidOptionError, match="prompt is empty"):
        engine.generate("")
    with pytest.raises(InvalidOptionError, match="token ids must be in"):
        engine.generate([1, 2, 100000])
    with pytest.raises(InvalidOptionError, match="string or a list of token ids"):
        engine.generate(3.5)
    with pytest.raises(ContextLengthError, match="context length is 512"):
        engine.generate([5] * 600)
    long = engine.generate([5] * 505, max_tokens=50)
    assert long.finish_reason == "length" and len(long.tokens) == 512 - 505


def test_concurrent_requests_from_threads_each_get_their_own_result(engines):
    engine = engines["gemma3"]
    expected = {p: engine.generate(p, max_tokens=12).tokens for p in ("alpha", "beta gamma", "delta")}
    results: dict[str, list[int]] = {}

    def run(p: str) -> None:
        results[p] = engine.generate(p, max_tokens=12).tokens

    threads = [threading.Thread(target=run, args=(p,)) for p in expected]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == expected


def test_memory_returns_to_baseline_after_close(tiny_dirs):
    mx.clear_cache()
    baseline = mx.get_active_memory()
    engine = lmx.load(tiny_dirs["qwen3"])
    engine.generate(PROMPT, max_tokens=20)
    assert mx.get_active_memory() > baseline
    engine.close()
    assert mx.get_active_memory() <= baseline
    with pytest.raises(EngineClosedError):
        engine.generate(PROMPT)


def test_memory_over_1000_tokens_grows_by_no_more_than_the_kv_cache(tmp_path):
    from tiny_models import save_tiny

    save_tiny("qwen3", tmp_path, max_position_embeddings=4096)
    with lmx.load(tmp_path) as engine:
        engine.generate(PROMPT, max_tokens=2)
        engine.scheduler.prefix_cache.clear()  # start the measurement with no cache held
        mx.clear_cache()
        before = mx.get_active_memory()
        result = engine.generate(PROMPT, max_tokens=1000, logit_bias={1: -100.0, 6: -100.0})
        assert len(result.tokens) == 1000
        assert engine.stats().kv_bytes == 0  # the row left the batch: its storage is gone
        kv_bytes = engine.scheduler.prefix_cache.nbytes  # what stays: the prompt's and the whole row's keys/values
        assert kv_bytes > 0
        assert mx.get_active_memory() - before <= kv_bytes + 64 * 1024

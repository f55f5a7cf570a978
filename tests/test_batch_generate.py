"""Engine.batch_generate: a padded batch gives every prompt what generating it alone gives (greedy)."""

from __future__ import annotations

import lmx  # isort: skip
import numpy as np

from lmx.results import Completion

PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return",
    "Numbers 12345 and 67890, dates like 2026-11-27. Cafe, naive, emoji and CJK text. How are you today?",
]


def assert_same(batch: list[Completion], alone: list[Completion]) -> None:
    assert len(batch) == len(alone)
    for i, (b, a) in enumerate(zip(batch, alone)):
        assert (b.text, b.tokens, b.finish_reason) == (a.text, a.tokens, a.finish_reason), f"prompt {i}"
        np.testing.assert_allclose(b.logprobs, a.logprobs, atol=1e-4, rtol=0, err_msg=f"prompt {i}")
        assert b.metrics.prompt_tokens == a.metrics.prompt_tokens
        assert b.metrics.generated_tokens == len(b.tokens)


def test_greedy_batch_equals_each_prompt_alone(engines: dict[str, lmx.Engine], arch: str) -> None:
    engine = engines[arch]
    alone = [engine.generate(p, max_tokens=12) for p in PROMPTS]
    assert_same(engine.batch_generate(PROMPTS, max_tokens=12), alone)
    assert_same(engine.batch_generate(PROMPTS[::-1], max_tokens=12), alone[::-1])
    assert_same(engine.batch_generate(PROMPTS[1:2], max_tokens=12), alone[1:2])
    assert_same(engine.batch_generate([PROMPTS[0], PROMPTS[0]], max_tokens=12), [alone[0], alone[0]])


def test_stop_strings_and_ids_end_each_row_on_its_own(engines: dict[str, lmx.Engine], arch: str) -> None:
    engine = engines[arch]
    free = [engine.generate(p, max_tokens=12) for p in PROMPTS]
    stop_text = free[1].text[4:7]  # row 1 stops within its text
    stop_id = free[2].tokens[5]  # row 2 stops at its 6th token (or earlier)
    opts = {"max_tokens": 12, "stop": [stop_text, stop_id]}
    alone = [engine.generate(p, **opts) for p in PROMPTS]
    batch = engine.batch_generate(PROMPTS, **opts)
    assert_same(batch, alone)
    assert (
        batch[1].finish_reason == "stop" and stop_text not in batch[1].text and len(batch[1].text) < len(free[1].text)
    )
    assert batch[2].finish_reason == "stop" and len(batch[2].tokens) <= 6
    assert "length" in {c.finish_reason for c in batch}  # and some row ran to max_tokens


def test_token_id_prompts(engines: dict[str, lmx.Engine]) -> None:
    engine = engines["gemma3"]
    ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    alone = [engine.generate(p, max_tokens=6) for p in ids]
    assert_same(engine.batch_generate(ids, max_tokens=6), alone)
    assert engine.batch_generate([], max_tokens=6) == []


def test_logprobs_and_penalties_match_alone(engines: dict[str, lmx.Engine], arch: str) -> None:
    engine = engines[arch]
    opts = {"max_tokens": 8, "logprobs": 3, "repetition_penalty": 1.5, "repetition_context_size": 64}
    alone = [engine.generate(p, **opts) for p in PROMPTS]
    batch = engine.batch_generate(PROMPTS, **opts)
    assert_same(batch, alone)
    for b, a in zip(batch, alone):
        assert b.top_logprobs is not None and a.top_logprobs is not None
        for tb, ta in zip(b.top_logprobs, a.top_logprobs):
            assert [t for t, _ in tb] == [t for t, _ in ta]
            np.testing.assert_allclose([v for _, v in tb], [v for _, v in ta], atol=1e-4, rtol=0)


def test_a_short_prompt_is_not_cut_by_a_long_one_near_the_context_length(engines: dict[str, lmx.Engine]) -> None:
    engine = engines["qwen3"]
    long_ids = (engine.tokenizer.encode(PROMPTS[3]) * 40)[: engine.context_length - 5]
    alone = [engine.generate(p, max_tokens=10) for p in (PROMPTS[0], long_ids)]
    assert [c.finish_reason for c in alone] == ["length", "length"]
    assert [len(c.tokens) for c in alone] == [10, 5]
    batch = engine.batch_generate([PROMPTS[0], long_ids], max_tokens=10)
    assert [len(c.tokens) for c in batch] == [10, 5]
    assert_same(batch, alone)


def test_stream_batch_streams_each_row_as_if_alone(engines: dict[str, lmx.Engine], arch: str) -> None:
    from lmx.generate.batch import batch_key, stream_batch

    engine = engines[arch]
    requests = [(PROMPTS[0], {"max_tokens": 10}), (PROMPTS[1], {"max_tokens": 3}), (PROMPTS[2], {"max_tokens": 7})]
    alone = [engine.generate(p, **o) for p, o in requests]
    streams = [engine.stream(p, **o) for p, o in requests]
    assert len({batch_key(s.request[1]) for s in streams}) == 1  # max_tokens is a row option
    pieces: dict[int, list[lmx.Token]] = {0: [], 1: [], 2: []}
    order = []
    for i, token in stream_batch(engine, streams):
        pieces[i].append(token)
        order.append(i)
    for i, (stream, a) in enumerate(zip(streams, alone)):
        assert (stream.text, stream.tokens, stream.finish_reason) == (a.text, a.tokens, a.finish_reason), i
        assert "".join(t.text for t in pieces[i]) == a.text and [t.id for t in pieces[i]] == a.tokens
        assert [t.finish_reason for t in pieces[i]] == [None] * (len(a.tokens) - 1) + [a.finish_reason]
        assert stream.metrics.generated_tokens == len(a.tokens) and stream.metrics.prompt_tokens > 0
    assert order[:3] == [0, 1, 2]  # rows interleave step by step, not one after the other
    # A row cancelled after its second token gets no more; the others are unaffected.
    streams = [engine.stream(p, **o) for p, o in requests]
    seen = {0: 0, 1: 0, 2: 0}
    for i, _ in stream_batch(engine, streams, cancelled=lambda i: i == 0 and seen[0] >= 2):
        seen[i] += 1
    assert seen == {0: 2, 1: len(alone[1].tokens), 2: len(alone[2].tokens)}
    assert streams[2].text == alone[2].text
    assert engine.generate(PROMPTS[0], max_tokens=10).text == alone[0].text  # the engine is free and unchanged


def test_batch_key_separates_what_a_batch_cannot_share() -> None:
    from lmx.generate.batch import batch_key
    from lmx.generate.options import GenerationOptions

    base = GenerationOptions()
    assert batch_key(base) == batch_key(GenerationOptions(max_tokens=5, stop=("x",)))
    assert batch_key(base) != batch_key(GenerationOptions(temperature=0.5))
    assert batch_key(base) != batch_key(GenerationOptions(logprobs=2))
    assert batch_key(GenerationOptions(seed=3)) == batch_key(base)  # greedy: the seed changes nothing
    assert batch_key(GenerationOptions(temperature=0.5, seed=3)) is None  # seeded sampling runs alone

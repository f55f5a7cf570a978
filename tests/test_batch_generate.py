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


def test_streams_submitted_together_run_as_one_batch_each_as_if_alone(
    engines: dict[str, lmx.Engine], arch: str
) -> None:
    engine = engines[arch]
    requests = [(PROMPTS[0], {"max_tokens": 10}), (PROMPTS[1], {"max_tokens": 3}), (PROMPTS[2], {"max_tokens": 7})]
    alone = [engine.generate(p, **o) for p, o in requests]
    before = engine.stats().batched_steps
    streams = [engine.stream(p, **o) for p, o in requests]
    pieces = [list(s) for s in streams]
    assert engine.stats().batched_steps > before  # the rows ran together
    for i, (stream, a) in enumerate(zip(streams, alone)):
        assert (stream.text, stream.tokens, stream.finish_reason) == (a.text, a.tokens, a.finish_reason), i
        assert "".join(t.text for t in pieces[i]) == a.text and [t.id for t in pieces[i]] == a.tokens
        assert [t.finish_reason for t in pieces[i]] == [None] * (len(a.tokens) - 1) + [a.finish_reason]
        assert stream.metrics.generated_tokens == len(a.tokens) and stream.metrics.prompt_tokens > 0


def test_a_bare_string_is_not_a_list_of_prompts(engines: dict[str, lmx.Engine]) -> None:
    import pytest

    from lmx.errors import InvalidOptionError

    with pytest.raises(InvalidOptionError, match="prompts must be a list of prompts.*got str"):
        engines["gemma3"].batch_generate("abc", max_tokens=2)

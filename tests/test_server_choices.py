"""OpenAI ``n > 1``: several choices of one request, decoded as rows of one batch, through the
real ``openai`` client against a live server."""

from __future__ import annotations

import lmx  # isort: skip

import argparse
from collections.abc import Iterator

import httpx
import openai
import pytest

from lmx.cli import serve
from lmx.server import BackgroundServer, ServerSettings

MESSAGES = [{"role": "user", "content": "Tell me a story."}]
SAMPLED = {"temperature": 1.0, "top_p": 0.95}


@pytest.fixture(scope="module")
def server(engine: lmx.Engine) -> Iterator[BackgroundServer]:
    with BackgroundServer(ServerSettings(port=0, model_name="tiny", max_n=4, warm_up=False), engine) as server:
        yield server


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0) as client:
        yield client


def test_chat_choices_are_seeded_rows_of_one_batch(client: openai.OpenAI, engine: lmx.Engine) -> None:
    before = engine.stats().batched_steps
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, n=3, seed=40, **SAMPLED)
    assert engine.stats().batched_steps > before  # the choices were decoded together
    assert [c.index for c in out.choices] == [0, 1, 2]
    # Choice i samples with seed + i: it equals a request of its own with that seed.
    alone = [
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, seed=40 + i, **SAMPLED)
        for i in range(3)
    ]
    for choice, single in zip(out.choices, alone):
        assert choice.message.content == single.choices[0].message.content
        assert choice.finish_reason == single.choices[0].finish_reason
    assert len({c.message.content for c in out.choices}) > 1  # different seeds, different samples
    assert out.usage.prompt_tokens == alone[0].usage.prompt_tokens  # the prompt counts once
    assert out.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    again = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, n=3, seed=40, **SAMPLED)
    assert [c.message.content for c in again.choices] == [c.message.content for c in out.choices]


def test_streamed_choices_carry_their_index(client: openai.OpenAI) -> None:
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=8, n=3, seed=7, **SAMPLED)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    texts, roles, finishes = ["", "", ""], [0, 0, 0], [None, None, None]
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        texts[choice.index] += choice.delta.content or ""
        roles[choice.index] += choice.delta.role == "assistant"
        finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    assert texts == [c.message.content for c in whole.choices]
    assert roles == [1, 1, 1]  # each choice's first delta names the role, once
    assert finishes == [c.finish_reason for c in whole.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert len({c.id for c in chunks}) == 1


def test_completion_choices_per_prompt_and_greedy(client: openai.OpenAI) -> None:
    prompts = ["The quick brown fox", "Numbers: 1 2 3"]
    out = client.completions.create(model="tiny", prompt=prompts, max_tokens=6, n=2, seed=3, **SAMPLED)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    for index, choice in enumerate(out.choices):  # prompt i's choices are i*n, i*n + 1
        alone = client.completions.create(
            model="tiny", prompt=prompts[index // 2], max_tokens=6, seed=3 + index % 2, **SAMPLED
        )
        assert choice.text == alone.choices[0].text
    assert out.usage.completion_tokens == 4 * 6
    greedy = client.completions.create(model="tiny", prompt=prompts[0], max_tokens=6, n=2, temperature=0)
    assert greedy.choices[0].text == greedy.choices[1].text
    single = client.completions.create(model="tiny", prompt=prompts[0], max_tokens=6, temperature=0)
    assert greedy.choices[0].text == single.choices[0].text
    assert greedy.usage.prompt_tokens == single.usage.prompt_tokens
    assert greedy.usage.completion_tokens == 2 * single.usage.completion_tokens


def test_n_above_the_limit_is_400_naming_it(server: BackgroundServer, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, n=5)
    assert e.value.body["param"] == "n"
    assert e.value.body["message"] == "n must be in [1, 4] (the server's max_n), got 5"
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1, "n": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    assert httpx.get(server.url + "/health").json()["queue"]["running"] == 0


def test_max_n_setting_and_flag() -> None:
    p = argparse.ArgumentParser(prog="lmx")
    serve.register(p.add_subparsers(dest="command", required=True))
    assert p.parse_args(["serve"]).max_n == 8
    assert p.parse_args(["serve", "--max-n", "3"]).max_n == 3
    with pytest.raises(lmx.errors.InvalidOptionError, match="max_n must be in"):
        ServerSettings(max_n=0)

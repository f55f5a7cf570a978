"""The OpenAI- and Ollama-compatible API, driven by the official ``openai`` client and httpx
against a live uvicorn server on 127.0.0.1 serving a tiny random model."""

from __future__ import annotations

import lmx  # isort: skip

import json
import math
from collections.abc import Iterator

import httpx
import openai
import pytest

from lmx.server import BackgroundServer, ServerSettings

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, how are you?"}]


@pytest.fixture(scope="module")
def server(engine: lmx.Engine) -> Iterator[BackgroundServer]:
    with BackgroundServer(ServerSettings(port=0, model_name="tiny"), engine) as server:
        yield server


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="not-needed", max_retries=0) as client:
        yield client


def test_models_and_health(server: BackgroundServer, client: openai.OpenAI, engine: lmx.Engine) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert models[0].owned_by == "lmx"
    assert models[0].model_extra["lmx"] == engine.info().as_dict()
    assert client.models.retrieve("tiny").id == "tiny"
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny"
    assert health["queue"] == {"running": 0, "waiting": 0, "max_queue": 16, "max_concurrency": 32}


def test_chat_streaming_equals_non_streaming_and_engine(client: openai.OpenAI, engine: lmx.Engine) -> None:
    whole = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    choice = whole.choices[0]
    assert whole.object == "chat.completion" and whole.model == "tiny"
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert whole.usage.completion_tokens == 12
    direct = engine.chat(MESSAGES, max_tokens=12)
    assert choice.message.content == direct.text
    assert whole.usage.prompt_tokens == direct.metrics.prompt_tokens
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 12

    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=12, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)


def test_completions_streaming_equals_non_streaming(client: openai.OpenAI, engine: lmx.Engine) -> None:
    whole = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=10)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == "length"
    assert whole.choices[0].text == engine.generate("The quick brown fox", max_tokens=10).text
    assert whole.usage.completion_tokens == 10
    stream = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=10, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)  # no include_usage: no usage chunk


def test_token_id_prompt_and_max_completion_tokens(client: openai.OpenAI, engine: lmx.Engine) -> None:
    ids = engine.tokenizer.encode("Hello world")
    out = client.completions.create(model="tiny", prompt=ids, max_tokens=5)
    assert out.choices[0].text == engine.generate(ids, max_tokens=5).text
    assert out.usage.prompt_tokens == len(ids)
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=3)
    assert chat.usage.completion_tokens == 3


def test_stop_string_ends_the_reply(client: openai.OpenAI, engine: lmx.Engine) -> None:
    full = engine.chat(MESSAGES, max_tokens=20).text
    stop = full[len(full) // 2 :][:2]
    assert stop
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=20, stop=[stop])
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].message.content == full[: full.index(stop)]


def test_seeded_sampling_is_reproducible(client: openai.OpenAI) -> None:
    kwargs = dict(model="tiny", prompt="Numbers", max_tokens=12, temperature=1.5, top_p=0.95, seed=11)
    first = client.completions.create(**kwargs).choices[0].text
    assert client.completions.create(**kwargs).choices[0].text == first
    extra = {"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2}
    out = client.completions.create(**kwargs, presence_penalty=0.5, frequency_penalty=0.5, extra_body=extra)
    assert out.usage.completion_tokens == 12


def test_chat_logprobs_match_the_engine(client: openai.OpenAI, engine: lmx.Engine) -> None:
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, logprobs=True, top_logprobs=3)
    direct = engine.chat(MESSAGES, max_tokens=6, logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == 6
    for entry, lp, top in zip(content, direct.logprobs, direct.top_logprobs):
        assert math.isclose(entry.logprob, lp, rel_tol=1e-5, abs_tol=1e-5)
        assert len(entry.top_logprobs) == 3
        assert [a.logprob for a in entry.top_logprobs] == pytest.approx([v for _, v in top], abs=1e-5)
        assert entry.bytes == list(entry.token.encode())
    # Greedy: the chosen token is the most likely alternative.
    assert all(e.top_logprobs[0].logprob == pytest.approx(e.logprob) for e in content)


def test_completion_logprobs_and_token_ids(server: BackgroundServer, engine: lmx.Engine) -> None:
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "logprobs": 2, "return_token_ids": True}
    out = httpx.post(server.url + "/v1/completions", json=body).json()
    choice = out["choices"][0]
    direct = engine.generate("Hello", max_tokens=4, logprobs=2)
    assert choice["token_ids"] == direct.tokens
    lps = choice["logprobs"]
    assert lps["token_logprobs"] == pytest.approx(direct.logprobs, abs=1e-5)
    assert [len(t) for t in lps["top_logprobs"]] == [2, 2, 2, 2] or len(set(lps["tokens"])) < 4
    assert lps["text_offset"][0] == 0
    assert out["metrics"]["generated_tokens"] == 4


def test_raw_sse_format(server: BackgroundServer) -> None:
    body = {
        "model": "tiny",
        "messages": MESSAGES,
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    usage = json.loads(events[-2][6:])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3
    assert usage["metrics"]["decode_tokens_per_s"] > 0


def test_ollama_chat_stream_equals_non_stream(server: BackgroundServer, engine: lmx.Engine) -> None:
    body = {"model": "tiny", "messages": MESSAGES, "options": {"num_predict": 8, "temperature": 0}}
    with httpx.stream("POST", server.url + "/api/chat", json=body) as response:
        assert response.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert all(not line["done"] for line in lines[:-1]) and lines[-1]["done"]
    final = lines[-1]
    assert final["done_reason"] == "length" and final["eval_count"] == 8
    assert final["prompt_eval_count"] > 0 and final["total_duration"] > 0
    streamed = "".join(line["message"]["content"] for line in lines)
    whole = httpx.post(server.url + "/api/chat", json={**body, "stream": False}).json()
    assert whole["done"] and whole["message"]["role"] == "assistant"
    assert whole["message"]["content"] == streamed == engine.chat(MESSAGES, max_tokens=8).text


def test_ollama_generate_and_tags(server: BackgroundServer, engine: lmx.Engine) -> None:
    raw = {"model": "tiny:latest", "prompt": "Once upon", "raw": True, "stream": False, "options": {"num_predict": 6}}
    out = httpx.post(server.url + "/api/generate", json=raw).json()
    assert out["response"] == engine.generate("Once upon", max_tokens=6).text and out["eval_count"] == 6
    templated = {"model": "tiny", "prompt": "Hi", "system": "Be brief.", "options": {"num_predict": 5, "stop": ["zzz"]}}
    with httpx.stream("POST", server.url + "/api/generate", json=templated) as response:
        lines = [json.loads(line) for line in response.iter_lines() if line]
    expected = engine.chat(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], max_tokens=5
    )
    assert "".join(line["response"] for line in lines) == expected.text
    tags = httpx.get(server.url + "/api/tags").json()["models"]
    assert [t["name"] for t in tags] == ["tiny"]
    assert tags[0]["details"]["family"] == "gemma3_text" and tags[0]["size"] == engine.info().weights_bytes
    assert httpx.get(server.url + "/api/version").json() == {"version": lmx.__version__}

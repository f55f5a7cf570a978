"""Server defaults a new user meets with a stock client: a capped ``max_tokens`` and model names
that do not have to match (issue 16, part 1)."""

from __future__ import annotations

import lmx  # isort: skip

import itertools
from collections.abc import Iterator

import httpx
import openai
import pytest

from lmx.cli.main import build_parser
from lmx.server import BackgroundServer, ServerSettings
from lmx.server.settings import DEFAULT_MAX_TOKENS

MESSAGES = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def server(engine: lmx.Engine) -> Iterator[BackgroundServer]:
    with BackgroundServer(ServerSettings(port=0, model_name="tiny", max_tokens_default=5), engine) as server:
        yield server


def test_max_tokens_default_is_capped() -> None:
    assert DEFAULT_MAX_TOKENS == 512 and ServerSettings().max_tokens_default == 512
    serve = build_parser().parse_args(["serve"])
    assert serve.max_tokens == 512 and not serve.strict_model_names


def test_request_without_max_tokens_gets_the_server_default(server: BackgroundServer) -> None:
    body = {"model": "tiny", "prompt": "Once upon a time"}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    usage, choice = r.json()["usage"], r.json()["choices"][0]
    assert usage["completion_tokens"] <= 5
    assert choice["finish_reason"] == "length" or usage["completion_tokens"] < 5


def test_any_model_name_runs_the_served_model(server: BackgroundServer, engine: lmx.Engine) -> None:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
        # LangChain's default model name; llama.cpp accepts any name too
        reply = client.chat.completions.create(model="gpt-3.5-turbo", messages=MESSAGES, max_tokens=4)
        assert reply.model == "tiny"
        assert reply.choices[0].message.content == engine.chat(MESSAGES, max_tokens=4).text
        with pytest.raises(openai.NotFoundError):  # a lookup still answers for listed models only
            client.models.retrieve("gpt-3.5-turbo")
    r = httpx.post(server.url + "/api/generate", json={"model": "llama3", "prompt": "x", "stream": False}, timeout=60)
    assert r.status_code == 200 and r.json()["model"] == "tiny"


def test_strict_model_names_answer_404(engine: lmx.Engine) -> None:
    settings = ServerSettings(port=0, model_name="tiny", strict_model_names=True, warm_up=False)
    with BackgroundServer(settings, engine) as server:
        body = {"model": "gpt-3.5-turbo", "messages": MESSAGES, "max_tokens": 2}
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert httpx.post(server.url + "/v1/chat/completions", json={**body, "model": "tiny"}).status_code == 200
    assert build_parser().parse_args(["serve", "--strict-model-names"]).strict_model_names


def test_readme_client_snippets_pass_max_tokens() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    parts = readme.split(".create(")
    # Calls that generate (chat.completions, completions); embeddings.create generates nothing.
    calls = [call for before, call in itertools.pairwise(parts) if before.endswith("completions")]
    assert calls, "the README shows the openai client"
    for call in calls:
        assert "max_tokens" in call.split("):")[0], call[:200]


def test_completions_accept_a_list_of_prompts(server: BackgroundServer, engine: lmx.Engine) -> None:
    prompts = ["Once upon a time", "The sea is", "Hello"]
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
        reply = client.completions.create(model="tiny", prompt=prompts, max_tokens=4)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert [c.text for c in reply.choices] == [engine.generate(p, max_tokens=4).text for p in prompts]
    assert reply.usage.completion_tokens == sum(len(engine.generate(p, max_tokens=4).tokens) for p in prompts)
    ids = [engine.tokenizer.encode("Hello"), engine.tokenizer.encode("The sea")]
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": ids, "max_tokens": 3}, timeout=60)
    assert r.status_code == 200 and [c["text"] for c in r.json()["choices"]] == [
        engine.generate(i, max_tokens=3).text for i in ids
    ]
    streamed = {"model": "tiny", "prompt": prompts, "max_tokens": 2, "stream": True}
    r = httpx.post(server.url + "/v1/completions", json=streamed, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_one_log_line_per_request(server: BackgroundServer, caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import re
    import time

    caplog.set_level(logging.INFO, logger="lmx.server.access")
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 3}
    assert httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
    streamed = {"model": "tiny", "prompt": "a", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=streamed, timeout=60) as r:
        assert r.status_code == 200 and "[DONE]" in r.read().decode()
    assert httpx.get(server.url + "/v1/nothing").status_code == 404
    for _ in range(100):  # a streamed response's line comes once the app returns, after the client saw [DONE]
        lines = [r.getMessage() for r in caplog.records if r.name == "lmx.server.access"]
        if len(lines) >= 3:
            break
        time.sleep(0.05)
    pattern = r"(POST|GET) (\S+) (\d{3}) (\d+) tokens [\d.]+ tok/s \d+ ms"
    parsed = sorted((re.fullmatch(pattern, line).groups() for line in lines), key=lambda p: p[1])
    assert [p[:3] for p in parsed] == [
        ("POST", "/v1/chat/completions", "200"),
        ("POST", "/v1/completions", "200"),
        ("GET", "/v1/nothing", "404"),
    ]
    tokens = [int(p[3]) for p in parsed]
    assert 1 <= tokens[0] <= 3 and 1 <= tokens[1] <= 3 and tokens[2] == 0

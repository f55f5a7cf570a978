"""Ollama's ``/api/show``, ``/api/ps`` and ``keep_alive``, through the real ``ollama`` client
against a live server."""

from __future__ import annotations

import lmx  # isort: skip

import datetime
import threading
from collections.abc import Iterator

import httpx
import ollama
import pytest

from lmx.server import BackgroundServer, ServerSettings
from lmx.server.errors import ApiRequestError
from lmx.server.keep_alive import parse_keep_alive


@pytest.fixture(scope="module")
def server(engine: lmx.Engine) -> Iterator[BackgroundServer]:
    with BackgroundServer(ServerSettings(port=0, model_name="tiny", warm_up=False), engine) as server:
        yield server


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> ollama.Client:
    return ollama.Client(host=server.url)


def test_show_describes_the_model(client: ollama.Client, engine: lmx.Engine) -> None:
    info = engine.info()
    out = client.show("tiny")
    assert out.details.family == info.model_type and out.details.format == "safetensors"
    assert out.details.quantization_level == info.dtype.upper()
    assert out.modelinfo["general.architecture"] == info.model_type
    assert out.modelinfo["general.parameter_count"] == info.num_parameters
    assert out.modelinfo["gemma3_text.context_length"] == info.context_length == 512
    assert out.modelinfo["gemma3_text.embedding_length"] == info.hidden_size
    assert out.template == engine.tokenizer.chat_templates["default"] and "{%" in out.template
    assert client.show("tiny:latest").modelinfo == out.modelinfo
    with pytest.raises(ollama.ResponseError) as e:
        client.show("llama3")
    assert e.value.status_code == 404 and "'llama3' is not served here" in e.value.error


def test_show_accepts_name_and_needs_a_model(server: BackgroundServer) -> None:
    r = httpx.post(server.url + "/api/show", json={"name": "tiny"})  # older clients send name
    body = r.json()
    assert r.status_code == 200 and body["lmx"]["has_template"] is True
    r = httpx.post(server.url + "/api/show", json={})
    assert r.status_code == 400 and r.json() == {"error": "missing required parameter 'model'"}


def expires_in(client: ollama.Client) -> float:
    (model,) = client.ps().models
    return (model.expires_at - datetime.datetime.now(datetime.timezone.utc)).total_seconds()


def test_ps_reports_the_model_and_keep_alive(client: ollama.Client, engine: lmx.Engine) -> None:
    (model,) = client.ps().models
    assert model.name == "tiny" and model.size == engine.info().weights_bytes
    assert model.details.family == engine.info().model_type
    client.generate(model="tiny", prompt="Hi", options={"num_predict": 2}, keep_alive="1h")
    assert 3500 < expires_in(client) <= 3600
    client.chat(model="tiny", messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 2}, keep_alive=90)
    assert 80 < expires_in(client) <= 90
    client.generate(model="tiny", prompt="Hi", options={"num_predict": 2}, keep_alive=-1)
    assert client.ps().models[0].expires_at.year == 2318  # Ollama's "forever"
    client.generate(model="tiny", prompt="Hi", options={"num_predict": 2})  # none: Ollama's default, 5 minutes
    assert 290 < expires_in(client) <= 300


def test_keep_alive_zero_clears_the_prefix_cache(client: ollama.Client, engine: lmx.Engine) -> None:
    client.generate(model="tiny", prompt="The quick brown fox", options={"num_predict": 3})
    assert engine.stats().prefix.entries > 0
    out = client.generate(model="tiny", prompt="The quick brown fox", options={"num_predict": 3}, keep_alive=0)
    assert out.done_reason == "length" and out.eval_count == 3
    cleared = threading.Event()
    for _ in range(200):  # cleared after the response was sent (a background task): wait for it
        if engine.stats().prefix.entries == 0:
            cleared.set()
            break
        cleared.wait(0.05)
    assert cleared.is_set()
    client.generate(model="tiny", prompt="Hello", options={"num_predict": 2})
    assert engine.stats().prefix.entries > 0
    unload = client.generate(model="tiny", keep_alive=0)  # Ollama's "unload now": no prompt
    assert unload.done_reason == "unload"
    for _ in range(200):
        if engine.stats().prefix.entries == 0:
            break
        cleared.wait(0.05)
    assert engine.stats().prefix.entries == 0


@pytest.mark.parametrize("value", ["abc", "5 minutes", "1d", "", True, [5], {"m": 5}, "m5", "5mm"])
def test_junk_keep_alive_is_400(server: BackgroundServer, value: object) -> None:
    for path, extra in (("/api/generate", {"prompt": "Hi"}), ("/api/chat", {"messages": []})):
        body = {"model": "tiny", "keep_alive": value, "stream": False, "options": {"num_predict": 1}, **extra}
        r = httpx.post(server.url + path, json=body, timeout=30)
        assert r.status_code == 400, r.text
        assert r.json()["error"].startswith('keep_alive must be a duration such as "5m", "1h" or "30s"')


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("5m", 300), ("1h", 3600), ("1h30m", 5400), ("500ms", 0.5), ("2.5s", 2.5), (10, 10), (0, 0), ("0", 0),
     ("300", 300), (-1, None), ("-1", None), ("-1m", None), (1.5, 1.5)],
)  # fmt: skip
def test_parse_keep_alive(value: object, seconds: float | None) -> None:
    assert parse_keep_alive(value) == seconds


def test_parse_keep_alive_refuses_junk() -> None:
    with pytest.raises(ApiRequestError, match="got 'forever'") as e:
        parse_keep_alive("forever")
    assert e.value.param == "keep_alive"
    with pytest.raises(ApiRequestError):
        parse_keep_alive(float("nan"))


def test_clear_prefix_cache(engine: lmx.Engine) -> None:
    engine.generate("Some prompt to cache", max_tokens=2)
    held = engine.stats().prefix.bytes
    assert held > 0 and engine.clear_prefix_cache() == held
    assert engine.stats().prefix.bytes == 0 and engine.stats().prefix.entries == 0
    assert engine.generate("Some prompt to cache", max_tokens=2).metrics.cached_tokens == 0

"""RemoteBackend: the lmx.Backend protocol over HTTP gives what the engine gives in process."""

from __future__ import annotations

import lmx  # isort: skip

import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lmx.errors import ContextLengthError, InvalidOptionError, ModelNotFoundError
from lmx.remote import RemoteBackend, RemoteError
from lmx.server import BackgroundServer, ServerSettings

KEY = "remote-key"
MESSAGES = [{"role": "user", "content": "Tell me a story"}]


@pytest.fixture(scope="module")
def engine(tiny_dirs: dict[str, Path]) -> Iterator[lmx.Engine]:
    with lmx.load(tiny_dirs["qwen3"]) as engine:
        yield engine


@pytest.fixture(scope="module")
def server(engine: lmx.Engine) -> Iterator[BackgroundServer]:
    with BackgroundServer(ServerSettings(port=0, api_key=KEY, strict_model_names=True), engine) as server:
        yield server


@pytest.fixture(scope="module")
def remote(server: BackgroundServer) -> Iterator[RemoteBackend]:
    with RemoteBackend(server.url, api_key=KEY) as remote:
        yield remote


def test_is_a_backend_and_describes_the_model(remote: RemoteBackend, engine: lmx.Engine) -> None:
    assert isinstance(remote, lmx.Backend)
    assert remote.model == engine.info().name
    assert remote.info() == engine.info()


def test_generate_equals_the_engine(remote: RemoteBackend, engine: lmx.Engine) -> None:
    got = remote.generate("Once upon a time", max_tokens=10, logprobs=2)
    want = engine.generate("Once upon a time", max_tokens=10, logprobs=2)
    assert (got.text, got.tokens, got.finish_reason) == (want.text, want.tokens, want.finish_reason)
    assert got.logprobs == pytest.approx(want.logprobs, abs=1e-5)
    assert [[i for i, _ in top] for top in got.top_logprobs] == [[i for i, _ in top] for top in want.top_logprobs]
    assert got.metrics.prompt_tokens == want.metrics.prompt_tokens and got.metrics.generated_tokens == 10
    assert got.metrics.decode_tokens_per_s > 0 and remote.metrics is got.metrics
    assert remote.generate("Once upon a time", max_tokens=2).top_logprobs is None
    ids = engine.tokenizer.encode("abc")
    assert remote.generate(ids, max_tokens=4).tokens == engine.generate(ids, max_tokens=4).tokens


def test_stream_equals_the_engine(remote: RemoteBackend, engine: lmx.Engine) -> None:
    stream = remote.stream("Hello", max_tokens=8, stop=["zz"])
    tokens = list(stream)
    want = list(engine.stream("Hello", max_tokens=8, stop=["zz"]))
    assert [(t.id, t.text, t.finish_reason) for t in tokens] == [(t.id, t.text, t.finish_reason) for t in want]
    assert [t.logprob for t in tokens] == pytest.approx([t.logprob for t in want], abs=1e-5)
    assert stream.text == "".join(t.text for t in want) and stream.finish_reason == "length"
    assert stream.metrics.generated_tokens == 8 and stream.metrics.prompt_tokens > 0


def test_chat_and_stream_chat_equal_the_engine(remote: RemoteBackend, engine: lmx.Engine) -> None:
    got = remote.chat(MESSAGES, max_tokens=9, logprobs=3)
    want = engine.chat(MESSAGES, max_tokens=9, logprobs=3)
    assert (got.text, got.tokens, got.finish_reason) == (want.text, want.tokens, want.finish_reason)
    assert [[i for i, _ in top] for top in got.top_logprobs] == [[i for i, _ in top] for top in want.top_logprobs]
    streamed = remote.stream_chat(MESSAGES, max_tokens=9, temperature=0.8, seed=3)
    assert [t.id for t in streamed] == [
        t.id for t in engine.stream_chat(MESSAGES, max_tokens=9, temperature=0.8, seed=3)
    ]
    kwargs = {"enable_thinking": False}
    got = remote.chat(MESSAGES, chat_template_kwargs=kwargs, max_tokens=4)
    assert got.tokens == engine.chat(MESSAGES, chat_template_kwargs=kwargs, max_tokens=4).tokens


def test_batch_generate(remote: RemoteBackend, engine: lmx.Engine) -> None:
    prompts = ["a b c", "Hello world"]
    got = remote.batch_generate(prompts, max_tokens=5)
    assert [c.tokens for c in got] == [engine.generate(p, max_tokens=5).tokens for p in prompts]


def test_closing_a_stream_stops_the_server(remote: RemoteBackend, server: BackgroundServer) -> None:
    before = httpx.get(server.url + "/health").json()["requests"]["cancelled"]
    stream = remote.stream("Go", max_tokens=400)
    first = [next(stream), next(stream)]
    stream.close()
    assert len(first) == 2
    for _ in range(3000):
        h = httpx.get(server.url + "/health").json()
        if h["queue"]["running"] == 0:
            break
        threading_wait(0.01)
    assert h["requests"]["cancelled"] == before + 1


def threading_wait(seconds: float) -> None:
    import threading

    threading.Event().wait(seconds)


def test_errors_map_to_lmx_errors(remote: RemoteBackend, server: BackgroundServer) -> None:
    with pytest.raises(InvalidOptionError, match="top_p"):  # checked before sending, like the engine
        remote.generate("x", top_p=2.0)
    with pytest.raises(InvalidOptionError, match="unknown option"):
        remote.generate("x", nonsense=1)
    with pytest.raises(InvalidOptionError, match="stop token id 5000"):  # checked by the server (vocab size)
        remote.generate("x", stop=[5000])
    with pytest.raises(ContextLengthError, match="context length"):
        remote.generate("fox " * 600, max_tokens=2)
    with pytest.raises(ContextLengthError):
        list(remote.stream("fox " * 600, max_tokens=2))
    with RemoteBackend(server.url, api_key=KEY, model="other") as other, pytest.raises(ModelNotFoundError):
        other.generate("x", max_tokens=1)
    with RemoteBackend(server.url, api_key="wrong") as bad, pytest.raises(RemoteError) as e:
        bad.generate("x", max_tokens=1)
    assert e.value.status == 401 and e.value.code == "invalid_api_key"
    with RemoteBackend("http://127.0.0.1:9", model="m", timeout=2) as nowhere, pytest.raises(RemoteError) as e:
        nowhere.generate("x")
    assert e.value.status == 0 and "cannot reach" in str(e.value)


def test_plain_openai_mode(server: BackgroundServer, engine: lmx.Engine) -> None:
    with RemoteBackend(server.url + "/v1", api_key=KEY, lmx_extensions=False) as plain:
        got = plain.chat(MESSAGES, max_tokens=6)
        assert got.text == engine.chat(MESSAGES, max_tokens=6).text
        assert got.tokens == [-1] and math.isnan(got.logprobs[0])  # no ids without the extension
        assert got.metrics.generated_tokens == 6
        tokens = list(plain.stream_chat(MESSAGES, max_tokens=6))
        assert "".join(t.text for t in tokens) == got.text and all(t.id == -1 for t in tokens)

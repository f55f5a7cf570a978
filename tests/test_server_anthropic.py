"""The Anthropic Messages API (``/v1/messages``), driven by the official ``anthropic`` client
(and httpx for the raw event stream and error bodies) against a live server on 127.0.0.1
serving a tiny random model."""

from __future__ import annotations

import lmx  # isort: skip

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx
import openai
import pytest

from lmx.server import BackgroundServer, ServerSettings

pytest_plugins = ["conftest_gguf"]

KEY = "sk-ant-test-0123456789"
SYSTEM = "You are a terse assistant. Answer in one word."
USER = [{"role": "user", "content": "Hello, how are you?"}]


@pytest.fixture(scope="module")
def server(engine: lmx.Engine) -> Iterator[BackgroundServer]:
    with BackgroundServer(ServerSettings(port=0, model_name="tiny"), engine) as server:
        yield server


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=server.url, api_key="not-needed", max_retries=0) as client:
        yield client


def text_of(message: Any) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def prompt_tokens(usage: Any) -> int:
    return usage.input_tokens + usage.cache_read_input_tokens


def test_create_message_equals_the_openai_chat_route(server: BackgroundServer, client: anthropic.Anthropic) -> None:
    message = client.messages.create(model="tiny", max_tokens=12, system=SYSTEM, messages=USER)
    assert message.type == "message" and message.role == "assistant" and message.model == "tiny"
    assert message.id.startswith("msg")
    assert [b.type for b in message.content] == ["text"]
    assert message.stop_reason == "max_tokens" and message.stop_sequence is None
    assert message.usage.output_tokens == 12
    with openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0) as oai:
        chat = oai.chat.completions.create(
            model="tiny", max_tokens=12, temperature=0, messages=[{"role": "system", "content": SYSTEM}, *USER]
        )
    assert text_of(message) == chat.choices[0].message.content  # greedy: the same tokens
    assert prompt_tokens(message.usage) == chat.usage.prompt_tokens
    # Content blocks are the same conversation as a string.
    blocks = client.messages.create(
        model="tiny",
        max_tokens=12,
        system=[{"type": "text", "text": SYSTEM}],
        messages=[{"role": "user", "content": [{"type": "text", "text": USER[0]["content"]}]}],
    )
    assert text_of(blocks) == text_of(message)
    # A repeat reads the prompt from the prefix cache: Anthropic's accounting splits it.
    again = client.messages.create(model="tiny", max_tokens=12, system=SYSTEM, messages=USER)
    assert again.usage.cache_read_input_tokens > 0
    assert prompt_tokens(again.usage) == prompt_tokens(message.usage)


def test_stream_accumulates_the_same_message(server: BackgroundServer, client: anthropic.Anthropic) -> None:
    whole = client.messages.create(model="tiny", max_tokens=10, messages=USER)
    with client.messages.stream(model="tiny", max_tokens=10, messages=USER) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1 and "".join(pieces) == text_of(whole)
    assert text_of(final) == text_of(whole)
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 10
    assert prompt_tokens(final.usage) == prompt_tokens(whole.usage)
    # The raw event sequence, as Anthropic sends it.
    body = {"model": "tiny", "max_tokens": 4, "messages": USER, "stream": True}
    with httpx.stream("POST", server.url + "/v1/messages", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        names, datas = [], []
        for line in r.iter_lines():
            if line.startswith("event: "):
                names.append(line[len("event: ") :])
            elif line.startswith("data: "):
                datas.append(json.loads(line[len("data: ") :]))
    assert [d["type"] for d in datas] == names
    deltas = names.count("content_block_delta")
    assert names == ["message_start", "content_block_start", "ping"] + ["content_block_delta"] * deltas + [
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert datas[-2]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert datas[-2]["usage"]["output_tokens"] == 4
    assert datas[0]["message"]["usage"]["output_tokens"] == 0 and datas[0]["message"]["content"] == []


def test_system_prompt_reaches_the_prompt(server: BackgroundServer, client: anthropic.Anthropic, engine) -> None:
    plain = client.messages.create(model="tiny", max_tokens=2, messages=USER)
    system = client.messages.create(model="tiny", max_tokens=2, system=SYSTEM, messages=USER)
    rendered = engine.tokenizer.encode_chat([{"role": "system", "content": SYSTEM}, *USER])
    assert prompt_tokens(system.usage) == len(rendered)
    assert prompt_tokens(system.usage) >= prompt_tokens(plain.usage) + len(engine.tokenizer.encode(SYSTEM)) - 2


def test_count_tokens_equals_usage(client: anthropic.Anthropic) -> None:
    for kwargs in ({}, {"system": SYSTEM}):
        counted = client.messages.count_tokens(model="tiny", messages=USER, **kwargs).input_tokens
        used = client.messages.create(model="tiny", max_tokens=1, messages=USER, **kwargs).usage
        assert counted == prompt_tokens(used) > 0


def test_stop_sequences(client: anthropic.Anthropic) -> None:
    whole = text_of(client.messages.create(model="tiny", max_tokens=24, messages=USER))
    stop = whole[len(whole) // 2 : len(whole) // 2 + 3]
    assert len(stop) == 3, whole
    cut = whole[: whole.index(stop)]
    message = client.messages.create(model="tiny", max_tokens=24, messages=USER, stop_sequences=["zzzq", stop])
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == stop
    assert text_of(message) == cut
    with client.messages.stream(model="tiny", max_tokens=24, messages=USER, stop_sequences=[stop]) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == stop and text_of(final) == cut
    # A stop sequence that never occurs changes nothing.
    unused = client.messages.create(model="tiny", max_tokens=24, messages=USER, stop_sequences=["zzzq"])
    assert unused.stop_reason == "max_tokens" and unused.stop_sequence is None and text_of(unused) == whole


def test_prefill_continues_the_assistant_turn(client: anthropic.Anthropic, engine: lmx.Engine) -> None:
    prefill = "I am fine"
    convo = [*USER, {"role": "assistant", "content": prefill}]
    message = client.messages.create(model="tiny", max_tokens=6, messages=convo)
    head = client.messages.count_tokens(model="tiny", messages=USER).input_tokens
    expected = head + len(engine.tokenizer.encode(prefill, add_special_tokens=False))
    assert prompt_tokens(message.usage) == expected
    assert client.messages.count_tokens(model="tiny", messages=convo).input_tokens == expected
    assert message.usage.output_tokens == 6


def test_disconnected_stream_is_cancelled(server: BackgroundServer) -> None:
    def requests() -> dict[str, int]:
        return httpx.get(server.url + "/health").json()["requests"]

    before = requests()
    body = {"model": "tiny", "max_tokens": 400, "messages": USER, "stream": True}
    with httpx.stream("POST", server.url + "/v1/messages", json=body, timeout=60) as r:
        assert next(line for line in r.iter_lines() if line == "event: content_block_delta")
    stop = threading.Event()
    for _ in range(3000):  # a failure bound, not a timing assertion
        state = httpx.get(server.url + "/health").json()
        if state["queue"]["running"] == 0:
            break
        stop.wait(0.01)
    assert requests()["cancelled"] == before["cancelled"] + 1


# ---------------------------------------------------------------- errors
def assert_anthropic_error(r: httpx.Response, status: int, kind: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == kind
    return body["error"]["message"]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"max_tokens": None}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "system", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "source.type"),
        ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}, "'document'"),
        ({"messages": []}, "messages"),
        ({"system": [{"type": "image"}]}, "system[0]"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"stop_sequences": "END"}, "stop_sequences"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "web_search_20250305"),
        ({"tools": [{"name": "f", "input_schema": "object"}]}, "input_schema"),
        ({"tool_choice": {"type": "auto"}}, "tool_choice"),
    ],
)
def test_bad_requests_are_anthropic_shaped_400s(server: BackgroundServer, change: dict[str, Any], named: str) -> None:
    body: dict[str, Any] = {"model": "tiny", "max_tokens": 4, "messages": USER}
    for key, value in change.items():
        if value is None:
            body.pop(key)
        else:
            body[key] = value
    message = assert_anthropic_error(httpx.post(server.url + "/v1/messages", json=body), 400, "invalid_request_error")
    assert named in message


def test_client_errors_and_routes(server: BackgroundServer, client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(
            model="tiny",
            max_tokens=4,
            messages=[{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "x"}}]}],
        )
    assert e.value.body["error"]["type"] == "invalid_request_error" and "image" in e.value.body["error"]["message"]
    r = httpx.post(server.url + "/v1/messages", content=b"{not json")
    assert_anthropic_error(r, 422, "invalid_request_error")
    assert "GET" in assert_anthropic_error(httpx.get(server.url + "/v1/messages"), 405, "invalid_request_error")
    assert_anthropic_error(httpx.post(server.url + "/v1/messages/nope", json={}), 404, "not_found_error")
    # The OpenAI routes keep their own shape.
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": USER, "top_p": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_p"


def test_unknown_model_is_not_found_with_strict_names(engine: lmx.Engine) -> None:
    settings = ServerSettings(port=0, model_name="tiny", strict_model_names=True)
    with (
        BackgroundServer(settings, engine) as server,
        anthropic.Anthropic(base_url=server.url, api_key="-", max_retries=0) as client,
    ):
        with pytest.raises(anthropic.NotFoundError) as e:
            client.messages.create(model="claude-sonnet-4-5", max_tokens=4, messages=USER)
        assert e.value.body["error"]["type"] == "not_found_error"
        assert "claude-sonnet-4-5" in e.value.body["error"]["message"]


def test_api_key_as_x_api_key(engine: lmx.Engine) -> None:
    with BackgroundServer(ServerSettings(port=0, model_name="tiny", api_key=KEY), engine) as server:
        with anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0) as client:
            assert client.messages.create(model="tiny", max_tokens=2, messages=USER).usage.output_tokens == 2
            assert client.messages.count_tokens(model="tiny", messages=USER).input_tokens > 0
        with anthropic.Anthropic(base_url=server.url, auth_token=KEY, max_retries=0) as bearer:  # Bearer works too
            assert bearer.messages.create(model="tiny", max_tokens=2, messages=USER).usage.output_tokens == 2
        wrong = anthropic.Anthropic(base_url=server.url, api_key="sk-wrong", max_retries=0)
        with wrong, pytest.raises(anthropic.AuthenticationError) as e:
            wrong.messages.create(model="tiny", max_tokens=2, messages=USER)
        assert e.value.body == {
            "type": "error",
            "error": {"type": "authentication_error", "message": "invalid API key"},
        }
        missing = httpx.post(server.url + "/v1/messages", json={"model": "tiny", "max_tokens": 2, "messages": USER})
        assert "x-api-key" in assert_anthropic_error(missing, 401, "authentication_error")
        assert missing.headers["www-authenticate"] == "Bearer"
        # x-api-key opens the OpenAI routes too; a wrong one does not.
        assert httpx.get(server.url + "/v1/models", headers={"x-api-key": KEY}).status_code == 200
        assert httpx.get(server.url + "/v1/models", headers={"x-api-key": "sk-wrong"}).status_code == 401


def test_tool_use_replies_through_the_seam(
    server: BackgroundServer, client: anthropic.Anthropic, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The route's tool path, with the seam returning a stand-in parser (every reply holds one
    call, the rest of its text kept) until the engine renders tools and parses calls itself:
    the client reads the tool_use block, streamed (input_json_delta) or not."""
    from lmx.server import routes_anthropic
    from lmx.server.anthropic_tools import ToolCalling

    @dataclass(frozen=True)
    class Call:
        id: str
        name: str
        arguments: str

    seen: list[Any] = []

    def options(tools: list[dict[str, Any]], choice: Any) -> dict[str, Any]:
        seen.append((tools, choice))
        return {}  # the engine takes no tools= yet

    calling = ToolCalling(
        parse=lambda text: (text, [Call("toolu_01", "get_weather", '{"city": "Paris"}')]), stream_options=options
    )
    monkeypatch.setattr(routes_anthropic, "tool_calling", lambda engine: calling)
    tools = [{"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    plain = client.messages.create(model="tiny", max_tokens=5, messages=USER)
    message = client.messages.create(
        model="tiny", max_tokens=5, messages=USER, tools=tools, tool_choice={"type": "any"}
    )
    assert seen[-1] == (
        [{"type": "function", "function": {"name": "get_weather", "parameters": tools[0]["input_schema"]}}],
        "required",
    )
    assert message.stop_reason == "tool_use"
    assert [b.type for b in message.content] == ["text", "tool_use"]
    assert message.content[0].text == text_of(plain)
    call = message.content[1]
    assert (call.id, call.name, call.input) == ("toolu_01", "get_weather", {"city": "Paris"})
    with client.messages.stream(model="tiny", max_tokens=5, messages=USER, tools=tools) as stream:
        final = stream.get_final_message()
    assert final.model_dump()["content"] == message.model_dump()["content"]
    assert final.stop_reason == "tool_use" and final.usage.output_tokens == 5
    # The follow-up turn with the tool's result is accepted and answered.
    follow = client.messages.create(
        model="tiny",
        max_tokens=3,
        tools=tools,
        messages=[
            *USER,
            {"role": "assistant", "content": message.model_dump()["content"]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "12 C"}]},
        ],
    )
    assert follow.usage.output_tokens == 3


@pytest.mark.slow
def test_real_model_stop_sequence_at_a_word_boundary(gemma_gguf: Any) -> None:
    """On the bundled Gemma 3 270M (SentencePiece: a word's token carries its leading space), a
    stop sequence starting with a space is found, cut, and named, streamed or not."""
    convo = [{"role": "user", "content": "List three fruits."}]
    with (
        lmx.load(gemma_gguf) as real,
        BackgroundServer(ServerSettings(port=0), real) as server,
        anthropic.Anthropic(base_url=server.url, api_key="-", max_retries=0) as client,
    ):
        whole = text_of(client.messages.create(model="m", max_tokens=30, system="Be brief.", messages=convo))
        words = [w for w in whole.split(" ")[1:] if len(w) >= 3 and w.isalpha()]
        assert words, whole
        stop = " " + words[0]
        cut = whole[: whole.index(stop)]
        message = client.messages.create(
            model="m", max_tokens=30, system="Be brief.", messages=convo, stop_sequences=[stop]
        )
        assert (text_of(message), message.stop_reason, message.stop_sequence) == (cut, "stop_sequence", stop)
        with client.messages.stream(
            model="m", max_tokens=30, system="Be brief.", messages=convo, stop_sequences=[stop]
        ) as stream:
            final = stream.get_final_message()
        assert (text_of(final), final.stop_reason, final.stop_sequence) == (cut, "stop_sequence", stop)
        counted = client.messages.count_tokens(model="m", system="Be brief.", messages=convo).input_tokens
        assert counted == prompt_tokens(final.usage)


def test_cors_preflight_allows_the_anthropic_headers(engine: lmx.Engine) -> None:
    asked = "x-api-key,anthropic-version,anthropic-dangerous-direct-browser-access,content-type"
    preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST"}
    settings = ServerSettings(port=0, cors_origins=("http://app.example",), api_key=KEY)
    with BackgroundServer(settings, engine) as server:
        r = httpx.options(server.url + "/v1/messages", headers={**preflight, "Access-Control-Request-Headers": asked})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
        allowed = {h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")}
        assert set(asked.split(",")) <= allowed
        denied = httpx.options(
            server.url + "/v1/messages", headers={**preflight, "Access-Control-Request-Headers": "x-other"}
        )
        assert denied.status_code == 400

"""Every error status of the API with its body shape, the API key, CORS and the settings checks."""

from __future__ import annotations

import lmx  # isort: skip

import base64
import json
import socket
import time
from collections.abc import Iterator
from http.client import HTTPConnection

import httpx
import openai
import pytest

from lmx.errors import InvalidOptionError
from lmx.server import BackgroundServer, ServerSettings

KEY = "sk-test-0123456789"
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def server(engine: lmx.Engine) -> Iterator[BackgroundServer]:
    settings = ServerSettings(port=0, model_name="tiny", api_key=KEY, max_body_bytes=4096, strict_model_names=True)
    with BackgroundServer(settings, engine) as server:
        yield server


@pytest.fixture(scope="module")
def http(server: BackgroundServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client


def assert_error(response: httpx.Response, status: int, code: str, param: str | None = None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["param"] == param
    assert isinstance(error["message"], str) and error["message"]
    return error["message"]


def test_api_key_required_except_health(server: BackgroundServer) -> None:
    assert httpx.get(server.url + "/health").status_code == 200
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/api/tags")]:
        r = httpx.request(method, server.url + path, json=CHAT)
        assert r.status_code == 401, path
        assert "missing API key" in (r.json()["error"]["message"] if path != "/api/tags" else r.json()["error"])
    assert_error(httpx.get(server.url + "/v1/models"), 401, "invalid_api_key")
    wrong = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer sk-test-0123456788"})
    assert "invalid API key" in assert_error(wrong, 401, "invalid_api_key")
    # The Lab page is served without the key (it asks for it itself); every 401 says Bearer.
    assert httpx.get(server.url + "/").status_code == 200
    assert httpx.get(server.url + "/static/lab.js").status_code == 200
    assert httpx.get(server.url + "/api/tags").headers["www-authenticate"] == "Bearer"
    assert httpx.get(server.url + "/v1/models").headers["www-authenticate"] == "Bearer"
    basic = base64.b64encode(f"me:{KEY}".encode()).decode()
    assert httpx.get(server.url + "/v1/models", headers={"Authorization": f"Basic {basic}"}).status_code == 200


def test_openai_client_errors(server: BackgroundServer) -> None:
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with bad, pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0) as client:
        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(model="gpt-4o", messages=CHAT["messages"])
        assert e.value.body["code"] == "model_not_found" and "gpt-4o" in e.value.body["message"]
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=CHAT["messages"], top_p=1.5)
        assert e.value.body["param"] == "top_p" and "1.5" in e.value.body["message"]
        assert client.chat.completions.create(**CHAT).usage.completion_tokens == 2


UNIQUE_ITEMS_TOOL = {
    "type": "function",
    "function": {
        "name": "f",
        "parameters": {"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}},
    },
}


@pytest.mark.parametrize(
    ("patch", "param", "code"),
    [
        ({"temperature": -1}, "temperature", "invalid_parameter"),
        ({"temperature": "hot"}, "temperature", "invalid_parameter"),
        ({"max_tokens": 0}, "max_tokens", "invalid_parameter"),
        ({"max_completion_tokens": 0}, "max_completion_tokens", "invalid_parameter"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "invalid_parameter"),
        ({"top_logprobs": 2}, "top_logprobs", "invalid_parameter"),
        ({"logit_bias": {"100000": 1}}, "logit_bias", "invalid_parameter"),
        ({"n": 9}, "n", "invalid_parameter"),  # above the server's max_n (8)
        ({"n": 0}, "n", "invalid_parameter"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools", "invalid_parameter"),
        ({"tools": [{"type": "code", "function": {"name": "f"}}]}, "tools", "invalid_parameter"),
        (
            {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "always"},
            "tool_choice",
            "invalid_parameter",
        ),
        ({"functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
        ({"response_format": {"type": "xml"}}, "response_format.type", "unsupported_parameter"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}},
            "response_format",
            "invalid_parameter",
        ),
        ({"grammar": {"type": "regex", "value": "a(b"}}, "grammar", "invalid_parameter"),
        ({"grammar": {"type": "gbnf", "value": "root ::= x"}}, "grammar.type", "invalid_parameter"),
        (  # a forced call's constraint is the tool's parameter schema: an unsupported keyword is named
            {"tools": [UNIQUE_ITEMS_TOOL], "tool_choice": "required"},
            "tools",
            "invalid_parameter",
        ),
        (
            {"tools": [UNIQUE_ITEMS_TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
            "invalid_parameter",
        ),
        ({"frobnicate": 1}, "frobnicate", "invalid_parameter"),
        ({"messages": []}, "messages", "invalid_parameter"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0]", "invalid_parameter"),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "x"}}]}]},
            "messages[0].content",
            "unsupported_parameter",
        ),
        (  # local paths are off unless the server allows a directory
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content[0]",
            "invalid_parameter",
        ),
        (  # remote URLs are never fetched
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://h/a.png"}}]}
                ]
            },
            "messages[0].content[0]",
            "invalid_parameter",
        ),
        ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_parameter"),
    ],
)
def test_bad_chat_parameters_are_400(http: httpx.Client, patch: dict, param: str, code: str) -> None:
    body = {k: v for k, v in {**CHAT, **patch}.items()}
    assert_error(http.post("/v1/chat/completions", json=body), 400, code, param)


def test_bad_completion_parameters_are_400(http: httpx.Client) -> None:
    base = {"model": "tiny", "max_tokens": 2}
    assert_error(http.post("/v1/completions", json=base), 400, "invalid_parameter", "prompt")
    assert_error(
        http.post("/v1/completions", json={**base, "prompt": ["a"] * 33}), 400, "unsupported_parameter", "prompt"
    )
    assert_error(
        http.post("/v1/completions", json={**base, "prompt": "a", "echo": True}), 400, "unsupported_parameter", "echo"
    )
    assert_error(http.post("/v1/completions", json={**base, "prompt": [999999]}), 400, "invalid_parameter")
    assert_error(http.post("/v1/completions", json={**base, "prompt": []}), 400, "invalid_parameter")
    # The tiny model's context is 512 tokens.
    message = assert_error(
        http.post("/v1/completions", json={**base, "prompt": "fox " * 600}), 400, "context_length_exceeded"
    )
    assert "512" in message


def test_unknown_model_and_route_are_404(http: httpx.Client) -> None:
    assert_error(http.post("/v1/chat/completions", json={**CHAT, "model": "nope"}), 404, "model_not_found", "model")
    assert_error(http.get("/v1/models/nope"), 404, "model_not_found", "model")
    assert "/v1/nothing" in assert_error(http.get("/v1/nothing"), 404, "not_found")
    assert_error(http.get("/v1/chat/completions"), 405, "method_not_allowed")


def test_body_too_large_is_413(http: httpx.Client) -> None:
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
    assert "4096" in assert_error(http.post("/v1/chat/completions", json=big), 413, "request_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while reading
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    assert_error(http.post("/v1/completions", content=chunks()), 413, "request_too_large")


def test_malformed_json_is_422(http: httpx.Client) -> None:
    for body in [b'{"model": "tiny", "messages": [', b"not json", b"[1, 2]", b""]:
        assert_error(http.post("/v1/chat/completions", content=body), 422, "invalid_json")


def test_ollama_routes_use_ollama_error_shape(http: httpx.Client) -> None:
    r = http.post("/api/chat", json={"model": "nope", "messages": []})
    assert r.status_code == 404 and r.json() == {"error": "model 'nope' is not served here; available: 'tiny'"}
    r = http.post("/api/generate", json={"model": "tiny", "prompt": "x", "options": {"temperature": -2}})
    assert r.status_code == 400 and "temperature" in r.json()["error"]
    r = http.post("/api/generate", json={"model": "tiny", "prompt": "x", "format": "yaml"})
    assert r.status_code == 400 and "format" in r.json()["error"]
    assert http.post("/api/chat", content=b"{").status_code == 422


def test_cors_closed_unless_configured(server: BackgroundServer, engine: lmx.Engine) -> None:
    preflight = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
    r = httpx.options(server.url + "/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    settings = ServerSettings(port=0, cors_origins=("http://app.example",))
    with BackgroundServer(settings, engine) as open_server:
        ok = httpx.options(
            open_server.url + "/v1/chat/completions", headers={**preflight, "Origin": "http://app.example"}
        )
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://app.example"
        other = httpx.options(open_server.url + "/v1/chat/completions", headers=preflight)
        assert "access-control-allow-origin" not in other.headers
        get = httpx.get(open_server.url + "/v1/models", headers={"Origin": "http://app.example"})
        assert get.headers["access-control-allow-origin"] == "http://app.example"


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"max_concurrency": 1000}, "max_concurrency"),
        ({"max_concurrency": 2.5}, "max_concurrency"),
        ({"max_queue": -1}, "max_queue"),
        ({"port": 70000}, "port"),
        ({"max_body_bytes": 10}, "max_body_bytes"),
        ({"api_key": "  "}, "api_key"),
        ({"cors_origins": ("evil.example",)}, "cors_origins"),
        ({"keep_alive_timeout": 0}, "keep_alive_timeout"),
        ({"body_timeout": 0}, "body_timeout"),
        ({"body_timeout": float("inf")}, "body_timeout"),
        ({"max_connections": 0}, "max_connections"),
        ({"max_connections": 1.5}, "max_connections"),
    ],
)
def test_settings_reject_bad_values(kwargs: dict, name: str) -> None:
    with pytest.raises(InvalidOptionError, match=name):
        ServerSettings(**kwargs)


def test_settings_defaults_are_safe() -> None:
    s = ServerSettings()
    assert (s.host, s.port, s.api_key, s.cors_origins) == ("127.0.0.1", 8090, None, ())
    assert s.is_loopback and not ServerSettings(host="0.0.0.0").is_loopback


def _closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the peer closed ``sock`` (recv returned b''), or None if it stayed open."""
    sock.settimeout(seconds)
    t0 = time.monotonic()
    try:
        while sock.recv(65536):
            pass  # the rest of a response
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return time.monotonic() - t0


def test_idle_connections_time_out(engine: lmx.Engine) -> None:
    settings = ServerSettings(port=0, model_name="tiny", keep_alive_timeout=1.0, warm_up=False)
    with BackgroundServer(settings, engine) as server:
        # A keep-alive connection that goes quiet after a response is closed after the timeout...
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            closed = _closed_within(sock, 10.0)
        assert closed is not None and closed < 5.0, closed
        # ...and so is one that connects and never sends a request.
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            closed = _closed_within(sock, 10.0)
        assert closed is not None and closed < 5.0, closed
        # ...and so is one that sends its request head too slowly (a byte every 0.3 s).
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            t0 = time.monotonic()
            with pytest.raises(OSError):
                for byte in b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" * 4:
                    sock.sendall(bytes([byte]))
                    time.sleep(0.3)
                    if _closed_within(sock, 0.001) is not None:
                        raise ConnectionResetError("closed")
            assert time.monotonic() - t0 < 5.0
        # A client that keeps talking is not cut off: three requests 0.6 s apart on one connection.
        connection = HTTPConnection("127.0.0.1", server.port)
        for _ in range(3):
            connection.request("GET", "/health")
            response = connection.getresponse()
            assert response.status == 200 and json.loads(response.read())["status"] == "ok"
            time.sleep(0.6)
        connection.close()

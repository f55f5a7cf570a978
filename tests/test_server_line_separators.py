"""A model's text holding the characters Python's ``str.splitlines()`` also ends lines at (U+0085, U+2028,
U+2029; JSON leaves them raw) reaches clients that read a stream line by line in one piece, on every
streaming route: httpx's ``iter_lines`` (what the ``ollama`` client and many hand-written clients read
with) cut such an event in two, and the client failed to parse it (``JSONDecodeError``: seen once in a
load test with sampled text). The model is a tiny scripted checkpoint (tests/scripted_model.py) that
writes exactly that text."""

from __future__ import annotations

import lmx  # isort: skip

import json
from collections.abc import Iterator
from typing import Any

import httpx
import ollama
import openai
import pytest

from lmx.models.qwen3 import CHAT_TEMPLATE as QWEN3_TEMPLATE
from lmx.server import BackgroundServer, ServerSettings
from scripted_model import save_scripted

TEXT = "One\u2028two\u2029three\x85four"
SCRIPTS = {"odd": ["One\u2028two", "\u2029three\x85four"]}
ASK = [{"role": "user", "content": "Say it."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    root = tmp_path_factory.mktemp("scripted") / "qwen"
    save_scripted(root, SCRIPTS, "odd", QWEN3_TEMPLATE)
    with lmx.load(root) as engine, BackgroundServer(ServerSettings(port=0, model_name="tiny"), engine) as s:
        yield s


def streamed_text(server: BackgroundServer, path: str, body: dict[str, Any], text_of: Any) -> str:
    """The text of a stream read line by line with httpx's line reader; every payload line must be JSON."""
    pieces = []
    with httpx.stream("POST", server.url + path, json=body, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line or line.startswith("event: ") or line == "data: [DONE]":
                continue
            payload = line.removeprefix("data: ")
            pieces.append(text_of(json.loads(payload)) or "")  # a cut event fails to parse here
    return "".join(pieces)


ROUTES = {
    "completions": (
        "/v1/completions",
        {"prompt": "Say it.", "max_tokens": 8},
        lambda e: e["choices"][0]["text"] if e["choices"] else "",
    ),
    "chat": (
        "/v1/chat/completions",
        {"messages": ASK, "max_tokens": 8},
        lambda e: e["choices"][0]["delta"].get("content") if e["choices"] else "",
    ),
    "anthropic": (
        "/v1/messages",
        {"messages": ASK, "max_tokens": 8},
        lambda e: e["delta"].get("text") if e["type"] == "content_block_delta" else "",
    ),
    "ollama_generate": ("/api/generate", {"prompt": "Say it.", "options": {"num_predict": 8}}, lambda e: e["response"]),
    "ollama_chat": ("/api/chat", {"messages": ASK, "options": {"num_predict": 8}}, lambda e: e["message"]["content"]),
}


@pytest.mark.parametrize("route", list(ROUTES))
def test_each_streaming_route_keeps_an_event_on_one_line(server: BackgroundServer, route: str) -> None:
    path, body, text_of = ROUTES[route]
    assert streamed_text(server, path, {"model": "tiny", "stream": True, "temperature": 0, **body}, text_of) == TEXT


def test_the_official_clients_get_the_text_whole(server: BackgroundServer) -> None:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0) as client:
        stream = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=8, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == TEXT
    parts = ollama.Client(host=server.url).generate(
        model="tiny", prompt="Say it.", stream=True, options={"num_predict": 8}
    )
    assert "".join(p["response"] for p in parts) == TEXT

"""Images in the Anthropic Messages API (``image`` blocks with a base64 source) and the
``pan_and_scan`` request field on the Anthropic, OpenAI and Ollama routes, driven by the official
``anthropic`` and ``openai`` clients (httpx for raw error bodies) against a live server serving a
tiny random Gemma 3 vision checkpoint."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import numpy as np
import openai
import pytest
from PIL import Image

import lmx
from lmx.server import BackgroundServer, ServerSettings
from test_vision_pan_and_scan import long_png
from tiny_models import IMAGE_TOKENS, save_tiny_multimodal

QUESTION = "What is in the picture?"


@pytest.fixture(scope="module")
def mm_engine(tmp_path_factory) -> Iterator[lmx.Engine]:
    d = tmp_path_factory.mktemp("tiny-gemma3-mm-anthropic")
    save_tiny_multimodal(d)
    with lmx.load(d) as engine:
        yield engine


@pytest.fixture(scope="module")
def server(mm_engine) -> Iterator[BackgroundServer]:
    with BackgroundServer(ServerSettings(port=0, model_name="tiny-vision", warm_up=False), mm_engine) as server:
        yield server


@pytest.fixture(scope="module")
def client(server) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0) as client:
        yield client


def encoded(seed: int, fmt: str = "PNG") -> bytes:
    arr = np.random.RandomState(seed).randint(0, 256, size=(24, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def solid(value: int, fmt: str = "PNG") -> bytes:
    """A one-colour image: the tiny model's reply tells black (0) from white (255) apart."""
    buf = io.BytesIO()
    Image.fromarray(np.full((24, 40, 3), value, np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def image_block(data: bytes, media_type: str = "image/png") -> dict[str, Any]:
    return {
        "type": "image",
        "source": {"type": "base64", "media_type": media_type, "data": base64.b64encode(data).decode()},
    }


def user(*blocks: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": list(blocks)}]


def text(message: Any) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


def prompt_tokens(usage: Any) -> int:
    return usage.input_tokens + usage.cache_read_input_tokens


def engine_chat(engine: lmx.Engine, data: bytes, n: int, **kw: Any) -> lmx.Completion:
    parts = [{"type": "image", "image": data}, {"type": "text", "text": QUESTION}]
    return engine.chat([{"role": "user", "content": parts}], max_tokens=n, temperature=0, stop=[], **kw)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_image_message_equals_engine_chat(client, mm_engine, fmt):
    data = solid(0, fmt)
    media = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}[fmt]
    message = client.messages.create(
        model="tiny-vision",
        max_tokens=8,
        messages=user(image_block(data, media), {"type": "text", "text": QUESTION}),
    )
    want = engine_chat(mm_engine, data, 8)
    assert text(message) == want.text
    assert message.usage.output_tokens == len(want.tokens)
    assert prompt_tokens(message.usage) == want.metrics.prompt_tokens > IMAGE_TOKENS
    # the reply depends on the image (so the equality above says the server read this one)
    assert engine_chat(mm_engine, solid(255, fmt), 8).tokens != want.tokens
    # streamed: the same text
    with client.messages.stream(
        model="tiny-vision",
        max_tokens=8,
        messages=user(image_block(data, media), {"type": "text", "text": QUESTION}),
    ) as stream:
        assert "".join(stream.text_stream) == want.text


def test_images_keep_their_place_among_text_and_merged_turns(client, mm_engine):
    a, b = encoded(3), encoded(4)
    message = client.messages.create(
        model="tiny-vision",
        max_tokens=6,
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "Compare"}, image_block(a)]},
            {"role": "user", "content": [{"type": "text", "text": "and"}, image_block(b)]},
        ],
    )
    parts = [
        {"type": "text", "text": "Compare"},
        {"type": "image", "image": a},
        {"type": "text", "text": "and"},  # no blank line after an image: its block is set off by them
        {"type": "image", "image": b},
    ]
    want = mm_engine.chat([{"role": "user", "content": parts}], max_tokens=6, temperature=0, stop=[])
    assert text(message) == want.text
    assert prompt_tokens(message.usage) == want.metrics.prompt_tokens
    counted = client.messages.count_tokens(
        model="tiny-vision",
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "Compare"}, image_block(a)]},
            {"role": "user", "content": [{"type": "text", "text": "and"}, image_block(b)]},
        ],
    )
    assert counted.input_tokens == want.metrics.prompt_tokens


def test_pan_and_scan_field_and_count_tokens(client, mm_engine):
    data = long_png()
    msgs = user(image_block(data), {"type": "text", "text": QUESTION})
    replies = {}
    for flag in (True, False):
        message = client.messages.create(
            model="tiny-vision", max_tokens=8, messages=msgs, extra_body={"pan_and_scan": flag}
        )
        want = engine_chat(mm_engine, data, 8, pan_and_scan=flag)
        assert text(message) == want.text
        assert prompt_tokens(message.usage) == want.metrics.prompt_tokens
        counted = client.messages.count_tokens(model="tiny-vision", messages=msgs, extra_body={"pan_and_scan": flag})
        assert counted.input_tokens == want.metrics.prompt_tokens
        replies[flag] = want.metrics.prompt_tokens
    # the image and 3 crops (each a block) against the image alone (the checkpoint's default: off)
    assert replies[True] - replies[False] > 3 * IMAGE_TOKENS
    default = client.messages.count_tokens(model="tiny-vision", messages=msgs)
    assert default.input_tokens == replies[False]


def test_an_image_in_a_tool_result(client, mm_engine):
    data = encoded(5)
    tools = [{"name": "screenshot", "description": "Take a screenshot", "input_schema": {"type": "object"}}]

    def conversation(result: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            {"role": "user", "content": "Take a screenshot"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "screenshot", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": result}]},
        ]

    with_image = conversation([{"type": "text", "text": "done"}, image_block(data)])
    message = client.messages.create(model="tiny-vision", max_tokens=4, tools=tools, messages=with_image)
    counted = client.messages.count_tokens(model="tiny-vision", tools=tools, messages=with_image)
    assert counted.input_tokens == prompt_tokens(message.usage)
    text_only = client.messages.count_tokens(
        model="tiny-vision", tools=tools, messages=conversation([{"type": "text", "text": "done"}])
    )
    assert counted.input_tokens >= text_only.input_tokens + IMAGE_TOKENS


# ---------------------------------------------------------------- errors
def error_of(r: httpx.Response) -> str:
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == "invalid_request_error"
    return body["error"]["message"]


def post(server: BackgroundServer, blocks: list[dict[str, Any]], **extra: Any) -> httpx.Response:
    body = {"model": "tiny-vision", "max_tokens": 2, "messages": [{"role": "user", "content": blocks}], **extra}
    return httpx.post(server.url + "/v1/messages", json=body)


def test_url_and_file_sources_are_refused(server, client):
    url = {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}
    message = error_of(post(server, [url, {"type": "text", "text": "hi"}]))
    assert "never fetches image URLs" in message and "messages[0].content[0].source.type" in message
    file = {"type": "image", "source": {"type": "file", "file_id": "file_123"}}
    assert "no Files API" in error_of(post(server, [file]))
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="tiny-vision", max_tokens=2, messages=user(url))
    assert e.value.status_code == 400 and e.value.body["error"]["type"] == "invalid_request_error"
    assert "never fetches" in e.value.body["error"]["message"]


@pytest.mark.parametrize(
    ("block", "named"),
    [
        (image_block(encoded(0), "image/bmp"), "'image/bmp'"),
        ({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "@@@"}}, "not valid base64"),
        (image_block(encoded(0, "JPEG"), "image/png"), "is image/jpeg data, but media_type says image/png"),
        (image_block(b"plain text, not a picture"), "not a PNG, JPEG, GIF or WebP image"),
        (image_block(encoded(0)[:60]), "truncated"),
        ({"type": "image", "source": {"type": "base64", "media_type": "image/png"}}, "source.data"),
        ({"type": "image"}, "source must be an object"),
        ({"type": "image", "source": {"type": "bytes"}}, "'bytes'"),
    ],
)
def test_bad_image_blocks_are_400s_naming_the_value(server, block, named):
    assert named in error_of(post(server, [block, {"type": "text", "text": "hi"}]))


def test_requests_that_cannot_take_images(server, engine):
    msg = error_of(
        httpx.post(
            server.url + "/v1/messages",
            json={
                "model": "tiny-vision",
                "max_tokens": 2,
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": [image_block(encoded(0))]},
                ],
            },
        )
    )
    assert "only be in user messages" in msg
    prefill = [{"role": "user", "content": [image_block(encoded(0))]}, {"role": "assistant", "content": "It is"}]
    body = {"model": "tiny-vision", "max_tokens": 2, "messages": prefill}
    assert "prefill" in error_of(httpx.post(server.url + "/v1/messages", json=body))
    assert "pan_and_scan" in error_of(post(server, [image_block(encoded(0))], pan_and_scan="yes"))
    # a model without a vision tower (the tiny text Gemma 3)
    with BackgroundServer(ServerSettings(port=0, model_name="tiny", warm_up=False), engine) as text_server:
        body = {"model": "tiny", "messages": user(image_block(encoded(0)))}
        assert "reads no images" in error_of(httpx.post(text_server.url + "/v1/messages/count_tokens", json=body))
        body["max_tokens"] = 2
        assert "reads no images" in error_of(httpx.post(text_server.url + "/v1/messages", json=body))


# ---------------------------------------------------------------- pan_and_scan on the other routes
def test_openai_and_ollama_pan_and_scan(server, mm_engine):
    data = long_png(300, 900, seed=6)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    msgs = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}],
        }
    ]
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as oai:
        for flag in (True, False):
            reply = oai.chat.completions.create(
                model="tiny-vision",
                messages=msgs,
                max_tokens=6,
                temperature=0,
                extra_body={"return_token_ids": True, "pan_and_scan": flag},
            )
            want = engine_chat(mm_engine, data, 6, pan_and_scan=flag)
            assert reply.choices[0].token_ids == want.tokens  # type: ignore[attr-defined]
            assert reply.usage.prompt_tokens == want.metrics.prompt_tokens
        with pytest.raises(openai.BadRequestError) as e:
            oai.chat.completions.create(
                model="tiny-vision", messages=msgs, max_tokens=2, extra_body={"pan_and_scan": "yes"}
            )
        assert e.value.body["param"] == "pan_and_scan"  # type: ignore[index]
    b64 = base64.b64encode(data).decode()
    ollama_msgs = [{"role": "user", "content": QUESTION, "images": [b64]}]
    for flag in (True, False):
        want = mm_engine.chat(
            [{"role": "user", "content": [{"type": "image", "image": data}, {"type": "text", "text": QUESTION}]}],
            max_tokens=6,
            temperature=0,
            pan_and_scan=flag,
        )
        for route, body in (
            ("/api/chat", {"messages": ollama_msgs}),
            ("/api/generate", {"prompt": QUESTION, "images": [b64]}),
        ):
            options = {"num_predict": 6, "temperature": 0, "pan_and_scan": flag}
            r = httpx.post(
                server.url + route, json={"model": "tiny-vision", "stream": False, "options": options, **body}
            )
            assert r.status_code == 200, r.text
            assert r.json()["prompt_eval_count"] == want.metrics.prompt_tokens
            got = r.json()["message"]["content"] if route == "/api/chat" else r.json()["response"]
            assert got == want.text
    r = httpx.post(
        server.url + "/api/chat",
        json={"model": "tiny-vision", "stream": False, "messages": ollama_msgs, "options": {"pan_and_scan": "on"}},
    )
    assert r.status_code == 400 and "options.pan_and_scan" in r.json()["error"]


def test_remote_backend_sends_pan_and_scan(server, mm_engine):
    data = long_png(seed=8)
    parts = [{"type": "image", "image": data}, {"type": "text", "text": QUESTION}]
    with lmx.RemoteBackend(server.url) as remote:
        for flag in (True, False):
            got = remote.chat([{"role": "user", "content": parts}], max_tokens=6, temperature=0, pan_and_scan=flag)
            want = engine_chat(mm_engine, data, 6, pan_and_scan=flag)
            assert got.tokens == want.tokens and got.metrics.prompt_tokens == want.metrics.prompt_tokens
        with pytest.raises(lmx.errors.InvalidOptionError, match="pan_and_scan"):
            remote.chat([{"role": "user", "content": parts}], max_tokens=2, pan_and_scan="on")

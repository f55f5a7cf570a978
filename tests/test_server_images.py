"""Images through the server: OpenAI ``image_url`` data URLs with the real ``openai`` client, Ollama
``images``, local paths only behind ``allow_local_images``, typed 400s for bad images."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

import lmx
from lmx.server import BackgroundServer, ServerSettings
from tiny_models import save_tiny_multimodal


def png(seed: int) -> bytes:
    arr = np.random.RandomState(seed).randint(0, 256, size=(24, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def mm_engine(tmp_path_factory) -> Iterator[lmx.Engine]:
    d = tmp_path_factory.mktemp("tiny-gemma3-mm")
    save_tiny_multimodal(d)
    with lmx.load(d) as engine:
        yield engine


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    (d / "cat.png").write_bytes(png(3))
    return d


@pytest.fixture(scope="module")
def server(mm_engine, image_dir) -> Iterator[BackgroundServer]:
    settings = ServerSettings(port=0, model_name="tiny-vision", allow_local_images=str(image_dir), warm_up=False)
    with BackgroundServer(settings, mm_engine) as server:
        yield server


@pytest.fixture(scope="module")
def client(server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
        yield client


def engine_reply(engine, image: bytes, text: str, n: int) -> list[int]:
    parts = [{"type": "image", "image": image}, {"type": "text", "text": text}]
    return engine.chat([{"role": "user", "content": parts}], max_tokens=n, temperature=0).tokens


def image_message(url: str, text: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}],
        }
    ]


def test_openai_client_data_url_equals_engine(client, mm_engine):
    image = png(1)
    reply = client.chat.completions.create(
        model="tiny-vision",
        messages=image_message(data_url(image), "What is in the picture?"),
        max_tokens=8,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    want = engine_reply(mm_engine, image, "What is in the picture?", 8)
    assert reply.choices[0].token_ids == want  # type: ignore[attr-defined]
    assert reply.usage.prompt_tokens > 16  # the image's soft tokens count as prompt tokens
    # streamed: the same text
    chunks = client.chat.completions.create(
        model="tiny-vision",
        messages=image_message(data_url(image), "What is in the picture?"),
        max_tokens=8,
        temperature=0,
        stream=True,
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == reply.choices[0].message.content


def test_local_paths_only_under_the_allowed_directory(client, mm_engine, image_dir):
    reply = client.chat.completions.create(
        model="tiny-vision",
        messages=image_message(str(image_dir / "cat.png"), "Hi"),
        max_tokens=4,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    assert reply.choices[0].token_ids == engine_reply(mm_engine, png(3), "Hi", 4)  # type: ignore[attr-defined]
    for url in (str(image_dir / ".." / "x.png"), "file:///etc/passwd", "https://example.com/cat.png"):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny-vision", messages=image_message(url, "Hi"), max_tokens=2)
        assert e.value.body["param"] == "messages[0].content[0]"  # type: ignore[index]


def test_bad_images_are_400(client):
    for url, code in (
        ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), "invalid_image"),
        ("data:image/png;base64,@@@", "invalid_parameter"),
        (data_url(png(0)[:100]), "invalid_image"),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny-vision", messages=image_message(url, "Hi"), max_tokens=2)
        assert e.value.body["code"] == code, url  # type: ignore[index]


def test_ollama_images(server, mm_engine):
    image = png(5)
    b64 = base64.b64encode(image).decode()
    with httpx.Client(base_url=server.url, timeout=60) as http:
        r = http.post(
            "/api/chat",
            json={
                "model": "tiny-vision",
                "messages": [{"role": "user", "content": "Describe", "images": [b64]}],
                "stream": False,
                "options": {"num_predict": 6, "temperature": 0},
            },
        )
        assert r.status_code == 200, r.text
        want = mm_engine.tokenizer.decode(engine_reply(mm_engine, image, "Describe", 6))
        assert r.json()["message"]["content"] == want
        g = http.post(
            "/api/generate",
            json={
                "model": "tiny-vision",
                "prompt": "Describe",
                "images": [b64],
                "stream": False,
                "options": {"num_predict": 6, "temperature": 0},
            },
        )
        assert g.status_code == 200, g.text
        assert g.json()["response"] == want
        bad = http.post(
            "/api/chat",
            json={"model": "tiny-vision", "messages": [{"role": "user", "content": "x", "images": ["%%%"]}]},
        )
        assert bad.status_code == 400 and "base64" in bad.json()["error"]


def test_a_text_model_answers_images_with_400(engine):
    settings = ServerSettings(port=0, model_name="tiny", warm_up=False)
    with BackgroundServer(settings, engine) as server:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="tiny", messages=image_message(data_url(png(0)), "Hi"), max_tokens=2)
        c.close()
    assert e.value.body["code"] == "invalid_image"  # type: ignore[index]
    assert "reads no images" in e.value.body["message"]  # type: ignore[index]


def test_remote_backend_sends_image_parts(server, mm_engine, tmp_path):
    from lmx.errors import ImageError
    from lmx.remote import RemoteBackend

    (tmp_path / "p.png").write_bytes(png(8))
    with RemoteBackend(server.url) as remote:
        for part in ({"type": "image", "image": png(8)}, {"type": "image", "path": str(tmp_path / "p.png")}):
            msgs = [{"role": "user", "content": [part, {"type": "text", "text": "Hi"}]}]
            assert remote.chat(msgs, max_tokens=5, temperature=0).tokens == engine_reply(mm_engine, png(8), "Hi", 5)
        with pytest.raises(ImageError, match="not an image"):
            remote.chat([{"role": "user", "content": [{"type": "image", "image": b"nope"}]}], max_tokens=2)

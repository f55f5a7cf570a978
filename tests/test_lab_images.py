"""The Lab page's attach-image button in a real browser (Playwright driving Debian's chromium):
attach a file, see its preview, send, see the streamed answer (the engine's reply to the same
image and text) with the image shown in the conversation."""

from __future__ import annotations

import lmx  # isort: skip

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from lmx.server import BackgroundServer, ServerSettings
from test_lab_page import ARGS, ARTIFACTS, CHROMIUM, open_page, stored_messages, wait_for_model
from tiny_models import save_tiny_multimodal

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="no browser: /usr/bin/chromium is missing (apt-get install chromium)"
)


@pytest.fixture(scope="module")
def mm_engine(tmp_path_factory) -> Iterator[lmx.Engine]:
    d = tmp_path_factory.mktemp("tiny-gemma3-mm")
    save_tiny_multimodal(d)
    with lmx.load(d) as engine:
        yield engine


@pytest.fixture(scope="module")
def server(mm_engine: lmx.Engine) -> Iterator[BackgroundServer]:
    with BackgroundServer(ServerSettings(port=0, model_name="tiny-vision", warm_up=False), mm_engine) as server:
        yield server


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        yield browser
        browser.close()


def picture(path: Path) -> bytes:
    arr = np.random.RandomState(7).randint(0, 256, size=(40, 56, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def test_attach_send_and_see_the_streamed_answer(browser: Any, server: BackgroundServer, mm_engine, tmp_path) -> None:
    data = picture(tmp_path / "photo.png")
    page = open_page(browser, server.url + "/")
    wait_for_model(page, "tiny-vision")
    page.fill("#max-tokens", "12")
    assert page.is_hidden("#attachments")
    page.set_input_files("#image-input", str(tmp_path / "photo.png"))
    page.wait_for_selector("#attachments .thumb")
    assert page.is_visible("#attachments") and page.locator("#attachments .thumb").count() == 1
    page.fill("#input", "What is in this picture?")
    page.press("#input", "Enter")
    page.wait_for_function(
        "document.body.dataset.state === 'idle' && document.querySelectorAll('.msg.assistant').length === 1 "
        "&& !document.querySelector('.msg.streaming')",
        timeout=120_000,
    )
    assert page.is_hidden("#attachments")  # the attachment went with the message
    assert page.locator(".msg.user .images .thumb").count() == 1  # the preview in the conversation
    src = page.get_attribute(".msg.user .images .thumb", "src")
    assert src.startswith("data:image/png;base64,")
    parts = [{"type": "image", "image": data}, {"type": "text", "text": "What is in this picture?"}]
    expected = mm_engine.chat([{"role": "user", "content": parts}], max_tokens=12, temperature=0)
    messages = stored_messages(page)
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert not messages[1].get("error"), messages[1]
    assert messages[1]["content"] == expected.text and expected.text.strip()
    assert page.inner_text(".msg.assistant .content").strip()  # the answer is on screen
    assert messages[1]["meta"]["tokens"] == len(expected.tokens)
    assert len(messages[0]["images"]) == 1  # kept with the chat
    assert page.errors == []
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "lab-image.png"))
    page.context.close()


def test_removing_an_attachment(browser: Any, server: BackgroundServer, tmp_path) -> None:
    picture(tmp_path / "a.png")
    page = open_page(browser, server.url + "/")
    wait_for_model(page, "tiny-vision")
    page.set_input_files("#image-input", [str(tmp_path / "a.png")])
    page.wait_for_selector("#attachments .thumb")
    page.click("#attachments .remove")
    assert page.is_hidden("#attachments") and page.locator("#attachments .thumb").count() == 0
    page.context.close()


def test_a_large_photo_is_sent_smaller(browser: Any, server: BackgroundServer, tmp_path) -> None:
    """A 9 MB PNG would pass the 4 MiB body limit as base64: the page sends it as a smaller JPEG."""
    arr = np.random.RandomState(1).randint(0, 256, size=(1500, 2000, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "big.png")
    assert (tmp_path / "big.png").stat().st_size > 8 * 2**20
    page = open_page(browser, server.url + "/")
    wait_for_model(page, "tiny-vision")
    page.fill("#max-tokens", "4")
    page.set_input_files("#image-input", str(tmp_path / "big.png"))
    page.wait_for_selector("#attachments .thumb")
    page.fill("#input", "What is this?")
    page.press("#input", "Enter")
    page.wait_for_function(
        "document.body.dataset.state === 'idle' && document.querySelectorAll('.msg.assistant').length === 1",
        timeout=120_000,
    )
    messages = stored_messages(page)
    assert not messages[1].get("error"), messages[1]
    sent = messages[0]["images"][0]
    assert sent.startswith("data:image/jpeg;base64,") and len(sent) < 4 * 2**20
    assert page.errors == []
    page.context.close()

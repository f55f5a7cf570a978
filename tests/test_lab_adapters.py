"""The Lab page with adapters served (issue 15, part 3): its model picker lists the base model and
each adapter, and a reply asked for with an adapter picked comes from that adapter (real
browser: Playwright driving Debian's chromium)."""

from __future__ import annotations

import lmx  # isort: skip

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lmx.server import BackgroundServer, ServerSettings
from test_adapters import make_adapter
from test_lab_page import ARGS, CHROMIUM, open_page, send, stored_messages, wait_for_model, wait_idle

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="no browser: /usr/bin/chromium is missing (apt-get install chromium)"
)


@pytest.fixture(scope="module")
def server(tiny_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    root = tmp_path_factory.mktemp("lab-adapters")
    a = make_adapter(tiny_dirs["gemma3"], root / "alpha", seed=1, rank=4, targets=("q_proj", "v_proj", "down_proj"))
    settings = ServerSettings(port=0, model_name="tiny-lab", adapters=(f"a={a}",))
    with lmx.load(tiny_dirs["gemma3"]) as engine, BackgroundServer(settings, engine) as server:
        yield server


def test_picker_lists_adapters_and_the_reply_comes_from_the_picked_one(server: BackgroundServer) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        try:
            page: Any = open_page(browser, server.url + "/")
            wait_for_model(page)
            assert page.locator("#model-select option").all_inner_texts() == ["tiny-lab", "a"]
            page.select_option("#model-select", "a")
            page.fill("#max-tokens", "12")
            with page.expect_request("**/v1/chat/completions") as sent:
                send(page, "Tell me a story")
            wait_idle(page)
            body = sent.value.post_data_json
            assert body["model"] == "a"
            shown = stored_messages(page)[-1]["content"]
            assert page.errors == []
        finally:
            browser.close()
    # the same request answered directly: by the adapter, and differently by the base model
    plain = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    by_adapter = httpx.post(server.url + "/v1/chat/completions", json=plain, timeout=120).json()
    by_base = httpx.post(server.url + "/v1/chat/completions", json={**plain, "model": "tiny-lab"}, timeout=120).json()
    assert shown and by_adapter["model"] == "a" and shown == by_adapter["choices"][0]["message"]["content"]
    assert shown != by_base["choices"][0]["message"]["content"]

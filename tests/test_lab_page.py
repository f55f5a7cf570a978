"""The Lab chat page in a real browser (Playwright driving Debian's chromium, headless):
streaming replies, Stop, conversations kept in localStorage, New chat, code blocks."""

from __future__ import annotations

import lmx  # isort: skip

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lmx.server import BackgroundServer, ServerSettings

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]  # fmt: skip

pytest_plugins = ["conftest_gguf"]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="no browser: /usr/bin/chromium is missing (apt-get install chromium)"
)

WATCH = """() => {
  window.lengths = [];
  new MutationObserver(() => {
    const all = document.querySelectorAll('.msg.assistant .content');
    if (all.length) window.lengths.push(all[all.length - 1].textContent.length);
  }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def server(engine: lmx.Engine) -> Iterator[BackgroundServer]:
    with BackgroundServer(ServerSettings(port=0, model_name="tiny-lab"), engine) as server:
        yield server


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        yield browser
        browser.close()


def open_page(browser: Any, url: str, width: int = 1280, height: int = 800, **context: Any) -> Any:
    """A page of ``url`` in a fresh browser context (its own localStorage), page errors collected."""
    page = browser.new_context(viewport={"width": width, "height": height}, **context).new_page()
    page.errors = []  # type: ignore[attr-defined]
    page.on("pageerror", lambda e: page.errors.append(str(e)))  # type: ignore[attr-defined]
    page.goto(url)
    return page


def wait_for_model(page: Any, name: str = "tiny-lab") -> None:
    page.wait_for_function(f"document.getElementById('model-name').textContent === {name!r}", timeout=120_000)


@pytest.fixture(scope="module")
def page(browser: Any, server: BackgroundServer) -> Iterator[Any]:
    page = open_page(browser, server.url + "/")
    wait_for_model(page)
    yield page
    page.context.close()


@pytest.fixture
def fresh(browser: Any, server: BackgroundServer) -> Iterator[Any]:
    """A page of its own for one test, so that the module's chats stay as the tests above left them."""
    page = open_page(browser, server.url + "/")
    wait_for_model(page)
    yield page
    page.context.close()


REPLY = 200  # tokens: about a second of streaming, so the page gets many frames to render in
CANDIDATES = ["Hello, who are you?", "Tell me a story", "The quick brown fox", "Numbers 12345", "hello world"]


def streaming_prompt(engine: lmx.Engine) -> str:
    """A prompt whose greedy reply releases text on many tokens. A random model often makes
    byte tokens that are not valid UTF-8, which the detokenizer holds back until the end."""
    for prompt in CANDIDATES:
        tokens = list(engine.stream_chat([{"role": "user", "content": prompt}], max_tokens=REPLY))
        if sum(1 for t in tokens[:-1] if t.text) >= 30:
            return prompt
    pytest.fail(f"none of {CANDIDATES} streams text with this random model")


def stored_messages(page: Any) -> list[dict[str, Any]]:
    chats = json.loads(page.evaluate("localStorage.getItem('lmx.lab.chats')"))
    current = page.evaluate("localStorage.getItem('lmx.lab.current')")
    return chats[current]["messages"]


def send(page: Any, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def test_page_shows_the_model(page: Any, engine: lmx.Engine) -> None:
    info = page.inner_text("#model-info")
    assert "gemma3_text" in info and "512 tokens" in info and "cpu" in info
    assert page.is_visible("#empty") and page.is_hidden("#stop")
    assert page.is_hidden("#banner")  # the tiny model has a chat template of its own


def test_reply_streams_in_and_is_kept(page: Any, engine: lmx.Engine, server: BackgroundServer) -> None:
    prompt = streaming_prompt(engine)
    page.fill("#max-tokens", str(REPLY))
    page.evaluate(WATCH)
    send(page, prompt)
    page.wait_for_function(
        "document.body.dataset.state === 'idle' && document.querySelectorAll('.msg.assistant').length === 1 "
        "&& !document.querySelector('.msg.streaming')",
        timeout=120_000,
    )
    lengths = page.evaluate("window.lengths")
    final = lengths[-1]
    growing = sorted({n for n in lengths if 0 < n < final})
    # At least one partial reply was on screen before the whole one. How many depends on how fast
    # this (possibly busy) machine draws frames, so no more is asked.
    assert final > 0 and len(growing) >= 1, f"the reply did not render incrementally: {lengths}"
    messages = stored_messages(page)
    assert [m["role"] for m in messages] == ["user", "assistant"]
    expected = engine.chat([{"role": "user", "content": prompt}], max_tokens=REPLY, temperature=0)
    assert messages[1]["content"] == expected.text
    assert messages[1]["meta"]["tokens"] == REPLY and messages[1]["meta"]["tps"] > 0
    assert f"{REPLY} tokens" in page.inner_text(".msg.assistant .meta")
    assert "tok/s" in page.inner_text("#stats")
    assert page.errors == []


def running(server: BackgroundServer) -> dict[str, Any]:
    return httpx.get(server.url + "/health").json()


def wait_for_server(server: BackgroundServer, busy: bool) -> dict[str, Any]:
    pause = threading.Event()
    for _ in range(1500):
        health = running(server)
        if (health["queue"]["running"] == 1) == busy:
            return health
        pause.wait(0.02)
    raise AssertionError(f"the server never became {'busy' if busy else 'idle'}: {health}")


def test_stop_ends_the_reply_and_frees_the_server(page: Any, server: BackgroundServer) -> None:
    cancelled = running(server)["requests"]["cancelled"]
    page.click("#new-chat")
    page.fill("#max-tokens", "480")
    send(page, "Tell me a long story")
    wait_for_server(server, busy=True)
    assert page.is_visible("#stop") and page.is_hidden("#send")
    page.click("#stop")
    page.wait_for_function("document.body.dataset.state === 'idle' && !document.querySelector('.msg.streaming')")
    assert page.is_visible("#send")
    last = stored_messages(page)[-1]
    assert last["role"] == "assistant" and last["meta"]["stopped"] is True and last["meta"]["tokens"] < 480
    assert "stopped" in page.inner_text(".msg.assistant .meta")
    assert wait_for_server(server, busy=False)["requests"]["cancelled"] == cancelled + 1


def test_conversations_survive_reload_then_new_chat(page: Any) -> None:
    page.reload()
    wait_for_model(page)
    assert page.locator(".msg.user").count() == 1 and page.locator(".msg.assistant").count() == 1
    assert "stopped" in page.inner_text(".msg.assistant .meta")
    assert page.input_value("#max-tokens") == "480"  # settings are kept too
    titles = page.locator("#chat-list li .title").all_inner_texts()
    assert len(titles) == 2 and titles[0] == "Tell me a long story"  # newest first
    page.click("#chat-list li:nth-child(2) .title")  # the first chat: its full reply is there
    assert page.locator(".msg.user").count() == 1 and page.locator(".msg.assistant .meta").inner_text().startswith(
        f"{REPLY} tokens"
    )
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "lab.png"))
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0 and page.is_visible("#empty")
    assert page.locator("#chat-list li .title").count() == 2  # an empty chat is not listed
    page.click("#chat-list li:nth-child(1) .delete")
    assert page.locator("#chat-list li .title").all_inner_texts() == [titles[1]]


def test_code_blocks_render_and_html_is_escaped(page: Any) -> None:
    html = page.evaluate("renderMarkdown('Use `x`:\\n\\n```python\\nprint(1 < 2)\\n```\\n<script>alert(1)</script>')")
    assert '<div class="codeblock">' in html and "<pre><code>print(1 &lt; 2)</code></pre>" in html
    assert "<span>python</span>" in html and "<code>x</code>" in html
    assert "<script>" not in html and "&lt;script&gt;" in html
    streaming = page.evaluate("renderMarkdown('```js\\nlet a = 1')")  # an open fence while streaming
    assert "<pre><code>let a = 1</code></pre>" in streaming


def show_stored_reply(page: Any, reply: str) -> None:
    """Put a chat whose assistant reply is ``reply`` into the page's own storage and reload: the
    page renders a kept reply with the same function as a streamed one. (The random test model
    cannot be steered into writing given text, so this is how a chosen answer reaches the page.)"""
    chat = {"id": "kept", "title": "kept", "updated": 1, "messages": [
        {"role": "user", "content": "question"}, {"role": "assistant", "content": reply, "meta": {}}]}  # fmt: skip
    page.evaluate(
        """(chat) => {
          const all = JSON.parse(localStorage.getItem('lmx.lab.chats') || '{}');
          all[chat.id] = chat;
          localStorage.setItem('lmx.lab.chats', JSON.stringify(all));
          localStorage.setItem('lmx.lab.current', chat.id);
        }""",
        chat,
    )
    page.reload()
    wait_for_model(page)


MARKDOWN = """# Title

Some *emphasis* and a [link](https://example.com/docs).

- one
- two

1. first
2. second

| name | value |
|------|-------|
| a    | 1     |

> quoted

```python
print("hi")
```
"""


def test_markdown_renders_lists_headings_tables_links_and_code(fresh: Any) -> None:
    show_stored_reply(fresh, MARKDOWN)
    content = fresh.locator(".msg.assistant .content")
    assert content.locator("h1").inner_text() == "Title"
    assert content.locator("em").inner_text() == "emphasis"
    assert content.locator("ul li").all_inner_texts() == ["one", "two"]
    assert content.locator("ol li").all_inner_texts() == ["first", "second"]
    assert content.locator("table th").all_inner_texts() == ["name", "value"]
    assert content.locator("table td").all_inner_texts() == ["a", "1"]
    assert content.locator("blockquote").inner_text().strip() == "quoted"
    link = content.locator("a")
    assert (
        link.get_attribute("href") == "https://example.com/docs" and link.get_attribute("rel") == "noopener noreferrer"
    )
    assert content.locator(".codeblock .codehead span").inner_text() == "python"
    assert content.locator(".codeblock pre code").inner_text() == 'print("hi")'
    assert fresh.errors == []


XSS = """Look <img src=x onerror="window.pwned = 'img'"> here.

<svg onload="window.pwned = 'svg'"></svg>

[click me](javascript:window.pwned='link') and <a href="javascript:window.pwned='raw'">raw link</a>
"""


def test_model_html_and_javascript_links_do_not_execute(fresh: Any) -> None:
    show_stored_reply(fresh, XSS)
    content = fresh.locator(".msg.assistant .content")
    assert "<img src=x" in content.inner_text()  # raw HTML is shown as text, not run
    assert content.locator("img, svg, script").count() == 0
    link = content.locator("a", has_text="click me")
    assert link.count() == 1 and link.get_attribute("href") is None  # DOMPurify dropped the javascript: URL
    for href in content.locator("a").evaluate_all("els => els.map(a => a.getAttribute('href'))"):
        assert href is None or not href.lower().startswith("javascript:")
    link.click()
    # The page is still this page, with no flag set by any of the payloads.
    assert fresh.evaluate("window.pwned") is None and fresh.locator(".msg.assistant").count() == 1
    assert fresh.errors == []


def wait_idle(page: Any) -> None:
    """Wait for the reply started by the last click or key to finish (the page sets the state to
    'streaming' synchronously in that event's handler)."""
    page.wait_for_function(
        "document.body.dataset.state === 'idle' && !document.querySelector('.msg.streaming')", timeout=120_000
    )


def chat_text(engine: lmx.Engine, prompt: str, max_tokens: int) -> str:
    return engine.chat([{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0).text


def test_copy_a_message(fresh: Any, server: BackgroundServer) -> None:
    fresh.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    show_stored_reply(fresh, MARKDOWN)
    fresh.click(".msg.assistant [data-action=copy]")
    fresh.wait_for_function("document.querySelector('.msg.assistant [data-action=copy]').textContent === 'Copied'")
    assert fresh.evaluate("navigator.clipboard.readText()") == MARKDOWN  # the Markdown source, not the HTML
    fresh.click(".msg.user [data-action=copy]")
    fresh.wait_for_function("document.querySelector('.msg.user [data-action=copy]').textContent === 'Copied'")
    assert fresh.evaluate("navigator.clipboard.readText()") == "question"


def test_regenerate_the_last_answer(fresh: Any, engine: lmx.Engine) -> None:
    fresh.fill("#max-tokens", "4")
    send(fresh, "Hello")
    wait_idle(fresh)
    assert stored_messages(fresh)[1]["content"] == chat_text(engine, "Hello", 4)
    assert fresh.locator(".msg.user [data-action=regenerate]").count() == 0
    fresh.fill("#max-tokens", "12")  # a longer answer, so the new one is told apart from the old
    fresh.click(".msg.assistant [data-action=regenerate]")
    wait_idle(fresh)
    messages = stored_messages(fresh)
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[1]["content"] == chat_text(engine, "Hello", 12)
    assert fresh.locator(".msg.assistant").count() == 1 and fresh.locator("[data-action=regenerate]").count() == 1
    assert fresh.errors == []


def test_edit_and_resend_a_user_turn(fresh: Any, engine: lmx.Engine) -> None:
    fresh.fill("#max-tokens", "6")
    send(fresh, "Hello")
    wait_idle(fresh)
    fresh.click(".msg.user [data-action=edit]")
    fresh.fill(".msg.user .edit-input", "Tell me a story")
    fresh.click(".msg.user [data-action=resend]")
    wait_idle(fresh)
    messages = stored_messages(fresh)
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", "Tell me a story"),
        ("assistant", chat_text(engine, "Tell me a story", 6)),
    ]
    assert fresh.locator(".msg.user .content").inner_text() == "Tell me a story"
    assert fresh.locator("#chat-list li .title").all_inner_texts() == ["Tell me a story"]
    # Cancel leaves the turn as it was.
    fresh.click(".msg.user [data-action=edit]")
    fresh.fill(".msg.user .edit-input", "never sent")
    fresh.click(".msg.user [data-action=cancel]")
    assert fresh.locator(".msg.user .content").inner_text() == "Tell me a story" and len(stored_messages(fresh)) == 2
    assert fresh.errors == []


def inside_viewport(page: Any, selector: str, width: int) -> bool:
    box = page.locator(selector).bounding_box()
    return box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width


def test_phone_width_reaches_new_chat_and_settings(browser: Any, server: BackgroundServer) -> None:
    phone = open_page(browser, server.url + "/", width=390, height=844, is_mobile=True, has_touch=True)
    try:
        wait_for_model(phone)
        assert phone.is_hidden("#sidebar") and phone.is_visible("#sidebar-toggle")
        assert inside_viewport(phone, "#input", 390) and inside_viewport(phone, "#send", 390)
        phone.fill("#input", "Hello")
        phone.tap("#send")
        wait_idle(phone)
        assert phone.locator(".msg").count() == 2
        phone.tap("#sidebar-toggle")
        assert phone.is_visible("#sidebar") and phone.get_attribute("#sidebar-toggle", "aria-expanded") == "true"
        assert inside_viewport(phone, "#new-chat", 390) and inside_viewport(phone, "#max-tokens", 390)
        phone.fill("#max-tokens", "64")  # the settings are reachable and kept
        phone.fill("#system-prompt", "Be brief.")
        phone.tap("#new-chat")  # starts a new chat and closes the drawer
        assert phone.is_hidden("#sidebar") and phone.locator(".msg").count() == 0 and phone.is_visible("#empty")
        settings = json.loads(phone.evaluate("localStorage.getItem('lmx.lab.settings')"))
        assert settings["maxTokens"] == 64 and settings["system"] == "Be brief."
        phone.tap("#sidebar-toggle")
        assert phone.locator("#chat-list li .title").all_inner_texts() == ["Hello"]
        phone.mouse.click(380, 400)  # the backdrop beside the drawer closes it
        assert phone.is_hidden("#sidebar")
        ARTIFACTS.mkdir(exist_ok=True)
        phone.screenshot(path=str(ARTIFACTS / "lab-phone.png"))
        assert phone.errors == []
    finally:
        phone.context.close()


KEY = "sk-lab-0123456789"


def test_with_an_api_key_the_page_loads_and_asks_for_it(browser: Any, engine: lmx.Engine) -> None:
    settings = ServerSettings(port=0, model_name="tiny-lab", api_key=KEY)
    with BackgroundServer(settings, engine) as keyed:
        # The page and its files need no key; the API does, and says Bearer.
        for path in ["/", "/static/lab.js", "/static/vendor/marked.umd.js"]:
            assert httpx.get(keyed.url + path).status_code == 200, path
        for path in ["/v1/models", "/api/tags"]:
            r = httpx.get(keyed.url + path)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
        r = httpx.post(keyed.url + "/v1/chat/completions", json={"model": "x", "messages": []})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"

        page = open_page(browser, keyed.url + "/")
        try:
            page.wait_for_selector("#key-dialog[open]")
            page.fill("#key-input", "sk-wrong")
            page.press("#key-input", "Enter")
            page.wait_for_function("document.getElementById('key-error').textContent.includes('refused')")
            assert page.is_visible("#key-dialog") and page.evaluate("sessionStorage.getItem('lmx.lab.apiKey')") is None
            page.fill("#key-input", KEY)
            page.click("#key-submit")
            wait_for_model(page)
            assert page.is_hidden("#key-dialog") and page.evaluate("sessionStorage.getItem('lmx.lab.apiKey')") == KEY
            assert page.evaluate("localStorage.getItem('lmx.lab.apiKey')") is None  # this tab only
            page.fill("#max-tokens", "5")
            with page.expect_request("**/v1/chat/completions") as request:
                send(page, "Hello")
            assert request.value.headers["authorization"] == f"Bearer {KEY}"
            wait_idle(page)
            reply = stored_messages(page)[-1]
            assert reply["role"] == "assistant" and "error" not in reply
            assert reply["content"] == chat_text(engine, "Hello", 5)
            page.reload()  # the same tab keeps the key
            wait_for_model(page)
            assert page.is_hidden("#key-dialog")
        finally:
            page.context.close()


def test_model_picker_and_json_mode_shape_the_request(fresh: Any, server: BackgroundServer) -> None:
    served = [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]]
    assert fresh.locator("#model-select option").all_inner_texts() == served
    assert fresh.input_value("#model-select") == served[0] and not fresh.is_checked("#json-mode")
    fresh.fill("#max-tokens", "4")
    with fresh.expect_request("**/v1/chat/completions") as plain:
        send(fresh, "Hello")
    wait_idle(fresh)
    body = plain.value.post_data_json
    assert body["model"] == served[0] and "response_format" not in body

    fresh.check("#json-mode")
    with fresh.expect_request("**/v1/chat/completions") as json_mode:
        send(fresh, "Give me a JSON object")
    wait_idle(fresh)
    body = json_mode.value.post_data_json
    assert body["response_format"] == {"type": "json_object"} and body["model"] == served[0]
    # The server answers that very body with a JSON object (constrained decoding), and the page
    # shows the same reply.
    plain_body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    direct = httpx.post(server.url + "/v1/chat/completions", json=plain_body, timeout=120)
    last = stored_messages(fresh)[-1]
    assert direct.status_code == 200 and "error" not in last
    content = direct.json()["choices"][0]["message"]["content"]
    assert content.startswith("{") and last["content"] == content
    settings = json.loads(fresh.evaluate("localStorage.getItem('lmx.lab.settings')"))
    assert settings["jsonMode"] is True and settings["model"] == served[0]


def test_base_model_banner(browser: Any, tiny_gguf: dict[str, Path]) -> None:
    """A GGUF with no chat template of its own (as the bundled base model): the page says so in one line."""
    with (
        lmx.load(tiny_gguf["qwen3"]) as base,
        BackgroundServer(ServerSettings(port=0, model_name="tiny-base"), base) as s,
    ):
        assert httpx.get(s.url + "/v1/models").json()["data"][0]["lmx"]["chat_template"] == "architecture"
        page = open_page(browser, s.url + "/")
        try:
            wait_for_model(page, "tiny-base")
            banner = page.locator("#banner")
            assert banner.is_visible() and "tiny-base has no chat template of its own" in banner.inner_text()
            assert "\n" not in banner.inner_text().strip()
            assert page.errors == []
        finally:
            page.context.close()

"""Hostile chat templates (issue 21, items 1 and 2): every render, from a model file or a
request, runs under time, size and depth limits, and whatever a template raises is a typed
``ChatTemplateError``; a server refuses request templates unless told to allow them."""

from __future__ import annotations

import lmx  # isort: skip

import _thread
import contextlib
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from lmx.errors import ChatTemplateError, InvalidOptionError, TokenizerError
from lmx.server import BackgroundServer, ServerSettings
from lmx.tokenizer import TemplateLimits
from lmx.tokenizer.chat import compile_chat_template, render_chat_template

MESSAGES = [{"role": "user", "content": "hi"}]
NORMAL = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
LOOP = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"

# Each of these pinned a CPU for hours, allocated hundreds of MB, or escaped untyped before.
HOSTILE = {
    "nested loops": (LOOP, "ran longer than"),
    "nested loops writing": (
        "{% for i in range(99999) %}{% for j in range(99999) %}x{% endfor %}{% endfor %}",
        "ran longer than|over the limit",
    ),
    "string repetition": ("{{ 'x' * 30000000 }}", r"repeated sequence \('\*'\) would be 30000000 long"),
    "repetition, count first": ("{{ 30000000 * 'x' }}", "repeated sequence"),
    "list repetition": ("{{ ['x' * 1000] * 100000 }}", "repeated sequence"),
    "doubling with ~": (
        "{% set ns = namespace(s='x' * 100000) %}{% for i in range(30) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
        "'~' concatenation",
    ),
    "doubling with +": (
        "{% set ns = namespace(s='x' * 100000) %}{% for i in range(30) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
        r"\('\+'\)",
    ),
    "center filter": ("{{ 'x'|center(100000000) }}", "'center' filter"),
    "center method": ("{{ 'x'.center(100000000) }}", r"str\.center"),
    "%-format width": ("{{ '%99999999d'|format(1) }}", "format width"),
    "str.format width": ("{{ '{:>99999999}'.format(1) }}", "format width"),
    "% operator width": ("{{ '%99999999d' % 1 }}", "format width"),
    "str.format through []": ("{{ '{:>99999999}'['format'](1) }}", "format width"),
    "width from the arguments": ("{{ '{:>{}}'.format(1, 99999999) }}", "format width"),
    "%* width": ("{{ '%*d' % (99999999, 1) }}", "format width"),
    "%* width in the format filter": ("{{ '%*d'|format(99999999, 1) }}", "format width"),
    "integer power": ("{{ 7 ** 100000000 }}", r"integer power"),
    "replace squaring": ("{% set s = 'x' * 1000 %}{{ s|replace('', s)|replace('', s)|length }}", "replace"),
    "join of a long list": ("{% set s = 'x' * 100000 %}{{ ([s] * 100)|join }}", "repeated sequence"),
    "captured block of one long string": (
        "{% set s = 'x' * 1000000 %}{% set t %}{% for i in range(5000) %}{{ s }}{% endfor %}{% endset %}",
        "captured block",
    ),
    "macro output of one long string": (
        "{% set s = 'x' * 1000000 %}{% macro m() %}{% for i in range(5000) %}{{ s }}{% endfor %}{% endmacro %}"
        "{{ m()|length }}",
        "macro output",
    ),
    "endless macro recursion": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "nested template calls"),
    "exponential macro recursion": (
        "{% macro f(n) %}{% if n < 40 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}{% endmacro %}{{ f(0) }}",
        "ran longer than",
    ),
    "ZeroDivisionError": ("{{ 1 / 0 }}", "ZeroDivisionError"),
    "OverflowError": ("{{ 10.0 ** 400 }}", "OverflowError"),
    "TypeError": ("{{ 1 + 'a' }}", "TypeError"),
    "int past the digit limit": ("{{ 10 ** 5000 }}", "ValueError"),
}


def render(source: str, limits: TemplateLimits | None = None, messages: list | None = None) -> str:
    return render_chat_template(
        compile_chat_template(source, name="t"), messages or MESSAGES, add_generation_prompt=True, limits=limits
    )


@pytest.mark.parametrize("source, message", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_template_is_a_typed_error(source: str, message: str) -> None:
    trace = sys.gettrace()
    with pytest.raises(ChatTemplateError, match=message):
        render(source)
    assert sys.gettrace() is trace  # the limit's tracer is gone again
    assert render(NORMAL) == "<user>hi"


def test_limits_are_settings() -> None:
    long = "{{ 'x' * 5000 }}"
    assert len(render(long)) == 5000
    with pytest.raises(ChatTemplateError, match="over the limit of 1000 characters"):
        render(long, TemplateLimits(max_output_chars=1000))
    with pytest.raises(ChatTemplateError, match="over the limit of 1000 characters"):  # the output itself
        render("{% for i in range(2000) %}x{% endfor %}", TemplateLimits(max_output_chars=1000))
    nested = "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(10) }}"
    assert render(nested) == ""
    with pytest.raises(ChatTemplateError, match="more than 5 nested"):
        render(nested, TemplateLimits(max_depth=5))
    with pytest.raises(ChatTemplateError, match="longer than 0.05 s"):
        render(LOOP, TemplateLimits(timeout_s=0.05))
    for bad in ({"timeout_s": 0}, {"timeout_s": float("inf")}, {"max_output_chars": 10}, {"max_depth": 10**6}):
        with pytest.raises(InvalidOptionError):
            TemplateLimits(**bad)


def test_ctrl_c_still_interrupts_a_render() -> None:
    # A KeyboardInterrupt is not a template failure: it must reach the caller as it is. A runner
    # started in the background by a non-interactive shell inherits SIGINT ignored, and then
    # interrupt_main does nothing: Python's own handler is put back for the test.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.2, _thread.interrupt_main)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            render(LOOP, TemplateLimits(timeout_s=30))
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)


def test_deeply_nested_message_is_typed() -> None:
    deep: object = "x"
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(TokenizerError, match="nested too deeply"):
        render(NORMAL, messages=[{"role": "user", "content": "hi", "extra": deep}])


@pytest.fixture(scope="module")
def model(tiny_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("template") / "qwen3"
    shutil.copytree(tiny_dirs["qwen3"], out)
    return out


def test_model_file_templates_are_limited_and_typed(model: Path) -> None:
    for source, message in [(LOOP, "ran longer than"), ("{{ 1 / 0 }}", "ZeroDivisionError")]:
        (model / "chat_template.jinja").write_text(source)
        with lmx.load(model) as engine:
            reference = engine.generate("hello", max_tokens=3).tokens
            with pytest.raises(ChatTemplateError, match=message):
                engine.chat(MESSAGES, max_tokens=2)
            engine.tokenizer.template_limits = TemplateLimits(timeout_s=0.05)
            with pytest.raises(ChatTemplateError, match="0.05 s"):
                engine.chat(MESSAGES, max_tokens=2, chat_template_kwargs={"chat_template": LOOP})
            assert engine.generate("hello", max_tokens=3).tokens == reference
    (model / "chat_template.jinja").unlink()


def test_template_from_gguf_metadata_is_limited(engine: lmx.Engine) -> None:
    # A GGUF's tokenizer.chat_template reaches the Tokenizer as chat_template=: the same renderer.
    from lmx.tokenizer import Tokenizer

    tok = Tokenizer(engine.tokenizer.backend, chat_template=LOOP, name="gguf-like")
    with pytest.raises(ChatTemplateError, match="chat template of gguf-like stopped"):
        tok.apply_chat_template(MESSAGES, template_limits=TemplateLimits(timeout_s=0.05))


# ------------------------------------------------------------------------------------------ server
KEY = "sk-template"


@pytest.fixture(scope="module")
def server(engine: lmx.Engine) -> Iterator[BackgroundServer]:
    with BackgroundServer(ServerSettings(port=0, model_name="tiny", api_key=KEY), engine) as server:
        yield server


@pytest.fixture(scope="module")
def open_server(engine: lmx.Engine) -> Iterator[BackgroundServer]:
    settings = ServerSettings(
        port=0, model_name="tiny", allow_request_chat_template=True, chat_template_timeout=0.2, max_concurrency=1
    )
    with BackgroundServer(settings, engine) as server:
        yield server


def chat(server: BackgroundServer, **kwargs: object) -> httpx.Response:
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 2, **kwargs}
    return httpx.post(
        server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    )


def test_server_refuses_request_templates_by_default(server: BackgroundServer) -> None:
    r = chat(server, chat_template_kwargs={"chat_template": NORMAL})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (
        error["param"] == "chat_template_kwargs.chat_template" and "--allow-request-chat-template" in error["message"]
    )
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="chat_template"):
        client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=2, extra_body={"chat_template_kwargs": {"chat_template": LOOP}}
        )
    for key in ("add_generation_prompt", "template_limits"):  # renderer arguments, not template variables
        r = chat(server, chat_template_kwargs={key: False})
        assert r.status_code == 400 and r.json()["error"]["param"] == f"chat_template_kwargs.{key}", r.text
    assert chat(server, chat_template_kwargs={"enable_thinking": False}).status_code == 200


def test_allowed_request_templates_run_under_the_server_limits(open_server: BackgroundServer) -> None:
    for source, message in [(LOOP, "0.2 s"), ("{{ 'x' * 30000000 }}", "repeated"), ("{{ 1 / 0 }}", "ZeroDivision")]:
        r = chat(open_server, chat_template_kwargs={"chat_template": source})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "chat_template_error" and message in r.json()["error"]["message"]
    r = chat(open_server, chat_template_kwargs={"chat_template": NORMAL})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] > 0


def test_server_template_settings_are_checked() -> None:
    with pytest.raises(InvalidOptionError, match="timeout_s"):
        ServerSettings(chat_template_timeout=0)
    with pytest.raises(InvalidOptionError, match="max_output_chars"):
        ServerSettings(chat_template_max_chars=5)


HARNESS = (
    "import argparse, sys\n"
    "from lmx.cli import serve\n"
    "p = argparse.ArgumentParser(prog='lmx')\n"
    "serve.register(p.add_subparsers(dest='command', required=True))\n"
    "a = p.parse_args(sys.argv[1:])\n"
    "sys.exit(a.func(a))\n"
)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_looping_templates_do_not_keep_the_server_from_stopping(tiny_dirs: dict[str, Path], sig: int) -> None:
    from test_server_cli import free_port

    port = free_port()
    cmd = [sys.executable, "-c", HARNESS, "serve", "--model", str(tiny_dirs["gemma3"]), "--port", str(port)]
    cmd += ["--allow-request-chat-template", "--model-name", "tiny", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    pause = threading.Event()
    try:
        for _ in range(600):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pause.wait(0.1)
        body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 2, "chat_template_kwargs": {"chat_template": LOOP}}
        storm = [
            threading.Thread(target=_post_quietly, args=(url + "/v1/chat/completions", body), daemon=True)
            for _ in range(4)
        ]
        for t in storm:
            t.start()
        pause.wait(0.3)  # the renders are running
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)  # without the limit, the renders never ended
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode in (0, -sig), err


def _post_quietly(url: str, body: dict) -> None:
    with contextlib.suppress(httpx.HTTPError):  # the server stops under us: that is the point of the test
        httpx.post(url, json=body, timeout=60)

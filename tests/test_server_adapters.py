"""Adapters over HTTP (issue 15, part 3): ``lmx serve --adapter NAME=PATH`` (repeatable) serves
LoRA adapters beside the model, ``/v1/models`` lists them, and a request's ``model`` picks one.
Pins the old bug: ``lmx serve --adapter`` was accepted, then ignored."""

from __future__ import annotations

import lmx  # isort: skip

import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anthropic
import httpx
import ollama
import openai
import pytest

from lmx.cli.main import build_parser
from lmx.errors import InvalidOptionError, ModelNotFoundError, WeightsError
from lmx.server import BackgroundServer, ServerSettings, create_app
from test_adapters import make_adapter
from test_server_cli import free_port

LMX = [sys.executable, "-m", "lmx.cli.main"]
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def adapter_dirs(tiny_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("served-adapters")
    return {
        "a": make_adapter(
            tiny_dirs["gemma3"], root / "alpha", seed=1, rank=4, targets=("q_proj", "v_proj", "down_proj")
        ),
        "b": make_adapter(tiny_dirs["gemma3"], root / "beta", seed=2, rank=2, targets=("o_proj", "up_proj")),
    }


@pytest.fixture(scope="module")
def reference(tiny_dirs: dict[str, Path], adapter_dirs: dict[str, Path]) -> Iterator[lmx.Engine]:
    """An engine with the same adapters, loaded in this process: what the server must answer."""
    with lmx.load(tiny_dirs["gemma3"]) as engine:
        engine.load_adapter(adapter_dirs["a"], name="a")
        engine.load_adapter(adapter_dirs["b"], name="beta")
        yield engine


def _expected(reference: lmx.Engine, adapter: str | None, n: int = 12) -> str:
    return reference.generate(PROMPT, max_tokens=n, adapter=adapter).text


def test_lmx_serve_adapter_loads_and_applies_it(
    tiny_dirs: dict[str, Path], adapter_dirs: dict[str, Path], reference: lmx.Engine
) -> None:
    port = free_port()
    cmd = [*LMX, "serve", "--model", str(tiny_dirs["gemma3"]), "--port", str(port), "--model-name", "tiny"]
    cmd += ["--adapter", f"a={adapter_dirs['a']}", "--adapter", str(adapter_dirs["b"]), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        pause = threading.Event()
        for _ in range(1200):
            if proc.poll() is not None:
                pytest.fail(f"lmx serve exited with {proc.returncode}: {proc.stderr.read()}")
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pause.wait(0.1)
        else:
            pytest.fail("lmx serve did not answer /health within 120 s")
        with openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0) as client:
            models = {m.id: m for m in client.models.list().data}
            assert list(models) == ["tiny", "a", "beta"]  # a bare PATH is named after its directory
            assert models["a"].parent == "tiny" and models["beta"].parent == "tiny"
            assert client.models.retrieve("beta").parent == "tiny"
            texts = {}
            for name in ("tiny", "a", "beta"):
                reply = client.completions.create(model=name, prompt=PROMPT, max_tokens=12, temperature=0)
                assert reply.model == name
                texts[name] = reply.choices[0].text
            # the adapters change the output, and each answers as the engine with it does
            assert texts["a"] != texts["tiny"] and texts["beta"] != texts["tiny"] and texts["a"] != texts["beta"]
            assert texts["tiny"] == _expected(reference, None)
            assert texts["a"] == _expected(reference, "a")
            assert texts["beta"] == _expected(reference, "beta")
            with pytest.raises(openai.NotFoundError) as err:
                client.completions.create(model="gpt-3.5-turbo", prompt=PROMPT, max_tokens=2)
            body = err.value.response.json()["error"]
            assert body["code"] == "model_not_found" and body["param"] == "model"
            assert "'gpt-3.5-turbo'" in body["message"] and "'tiny', 'a', 'beta'" in body["message"]
        client_ollama = ollama.Client(host=url)
        reply = client_ollama.generate(model="a", prompt=PROMPT, raw=True, options={"num_predict": 12})
        assert reply.response == texts["a"] and reply.model == "a"
        assert (
            client_ollama.generate(model="tiny", prompt=PROMPT, raw=True, options={"num_predict": 12}).response
            == (texts["tiny"])
        )
        with pytest.raises(ollama.ResponseError) as oerr:
            client_ollama.generate(model="llama3", prompt=PROMPT, raw=True)
        assert oerr.value.status_code == 404 and "'a'" in str(oerr.value.error)
        tags = [m.model for m in client_ollama.list().models]
        assert tags == ["tiny", "a", "beta"]
        shown = client_ollama.show("a:latest")
        assert shown.details.parent_model == "tiny" and shown.capabilities == ["completion"]
        assert client_ollama.show("tiny").capabilities == ["completion", "embedding"]
    finally:
        proc.send_signal(signal.SIGINT)
        _, err_text = proc.communicate(timeout=60)
    assert proc.returncode == 0, err_text


def test_concurrent_requests_for_each_adapter_are_each_right(
    tiny_dirs: dict[str, Path], adapter_dirs: dict[str, Path], reference: lmx.Engine
) -> None:
    settings = ServerSettings(
        port=0, model_name="tiny", adapters=(f"a={adapter_dirs['a']}", f"beta={adapter_dirs['b']}")
    )
    messages = [{"role": "user", "content": "Tell me a story"}]
    want = {
        name: reference.chat(messages, max_tokens=10, adapter=ad).text
        for name, ad in [("tiny", None), ("a", "a"), ("beta", "beta")]
    }
    with lmx.load(tiny_dirs["gemma3"]) as engine, BackgroundServer(settings, engine) as server:
        assert engine.adapters() == ["a", "beta"]  # the server loaded them onto the engine it was given
        before = engine.stats().batched_steps

        def ask(name: str) -> tuple[str, str]:
            with openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0) as client:
                reply = client.chat.completions.create(model=name, messages=messages, max_tokens=10, temperature=0)
                return name, reply.choices[0].message.content or ""

        names = ["tiny", "a", "beta"] * 4
        with ThreadPoolExecutor(len(names)) as pool:
            replies = list(pool.map(ask, names))
        assert engine.stats().batched_steps > before
        for name, text in replies:
            assert text == want[name], name
        # Ollama chat picks by model too, name:latest included
        r = httpx.post(
            server.url + "/api/chat",
            json={"model": "beta:latest", "messages": messages, "stream": False, "options": {"num_predict": 10}},
            timeout=60,
        )
        assert r.status_code == 200 and r.json()["message"]["content"] == want["beta"]
        # OpenAI n > 1: every choice with the adapter
        with openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0) as client:
            reply = client.chat.completions.create(model="a", messages=messages, max_tokens=10, temperature=0, n=2)
            assert [c.message.content for c in reply.choices] == [want["a"]] * 2 and reply.model == "a"
        # Anthropic Messages picks by model too
        with anthropic.Anthropic(base_url=server.url, api_key="-", max_retries=0) as claude:
            message = claude.messages.create(model="beta", max_tokens=10, messages=messages)
            assert message.content[0].text == want["beta"]
            with pytest.raises(anthropic.NotFoundError):
                claude.messages.create(model="claude-sonnet-4-5", max_tokens=2, messages=messages)
        # embeddings come from the base model: an adapter's name is refused, not ignored
        r = httpx.post(server.url + "/v1/embeddings", json={"model": "a", "input": "hi"}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "model" and "'a'" in r.json()["error"]["message"]
        assert (
            httpx.post(server.url + "/v1/embeddings", json={"model": "tiny", "input": "hi"}, timeout=60).status_code
            == 200
        )
        # the Python client: the adapter option becomes the request's model
        with lmx.RemoteBackend(server.url) as remote:
            assert remote.chat(messages, max_tokens=10, adapter="a").text == want["a"]
            assert remote.chat(messages, max_tokens=10).text == want["tiny"]


def test_no_adapters_keeps_lenient_names(tiny_dirs: dict[str, Path]) -> None:
    with (
        lmx.load(tiny_dirs["gemma3"]) as engine,
        BackgroundServer(ServerSettings(port=0, warm_up=False), engine) as server,
    ):
        body = {"model": "gpt-3.5-turbo", "prompt": PROMPT, "max_tokens": 2}
        assert httpx.post(server.url + "/v1/completions", json=body, timeout=60).status_code == 200
        assert [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]] == [server.state.model_id]


def test_bad_adapter_settings_are_refused(
    tiny_dirs: dict[str, Path], adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    args = build_parser().parse_args(["serve", "--adapter", "a=/x", "--adapter", "/y/b"])
    assert args.adapter == ["a=/x", "/y/b"]
    with pytest.raises(InvalidOptionError, match="'a' more than once"):
        ServerSettings(adapters=("a=/x", "a=/y"))
    with pytest.raises(InvalidOptionError, match="'alpha' more than once"):
        ServerSettings(adapters=(str(adapter_dirs["a"]), f"alpha={adapter_dirs['b']}"))
    with pytest.raises(InvalidOptionError, match="adapter name must be"):
        ServerSettings(adapters=("/",))
    with lmx.load(tiny_dirs["gemma3"]) as engine:
        with pytest.raises(InvalidOptionError, match="served model's name"):
            create_app(
                ServerSettings(model_name="tiny", adapters=(f"tiny={adapter_dirs['a']}",), warm_up=False), engine
            )
        with pytest.raises(ModelNotFoundError, match="nowhere"):
            create_app(ServerSettings(adapters=(f"x={tmp_path / 'nowhere'}",), warm_up=False), engine)
        broken = tmp_path / "broken"
        broken.mkdir()
        (broken / "adapter_config.json").write_bytes((adapter_dirs["a"] / "adapter_config.json").read_bytes())
        (broken / "adapters.safetensors").write_bytes(b"not safetensors")
        with pytest.raises(WeightsError, match="broken"):
            create_app(ServerSettings(adapters=(str(broken),), warm_up=False), engine)
        assert engine.adapters() == []


def test_lmx_generate_adapter_applies_it(
    tiny_dirs: dict[str, Path], adapter_dirs: dict[str, Path], reference: lmx.Engine
) -> None:
    base = [*LMX, "generate", PROMPT, "--model", str(tiny_dirs["gemma3"]), "--max-tokens", "12"]
    with_adapter = subprocess.run([*base, "--adapter", str(adapter_dirs["a"])], capture_output=True, text=True)
    without = subprocess.run(base, capture_output=True, text=True)
    assert with_adapter.returncode == 0 and without.returncode == 0, with_adapter.stderr + without.stderr
    assert with_adapter.stdout.rstrip("\n") == _expected(reference, "a")
    assert without.stdout.rstrip("\n") == _expected(reference, None) != _expected(reference, "a")

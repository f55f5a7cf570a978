"""``POST /v1/classify`` and ``RemoteBackend.classify``: the engine's scores over HTTP, against a
live uvicorn server on 127.0.0.1 serving a tiny random model; every bad input a 400 naming its field."""

from __future__ import annotations

import lmx  # isort: skip

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from lmx.errors import InvalidOptionError
from lmx.remote import RemoteBackend
from lmx.server import BackgroundServer, ServerSettings

KEY = "sk-classify-test"
MAX_TEXTS = 4
MAX_LABELS = 5
LABELS = ["the quick", "the lazy", "dog"]  # the first two share their first token
TEXTS = ["Hello world! How are you today?", "def add(a, b):\n    return a + b\n", "x"]
EXAMPLES = [("The quick brown fox", "the quick"), ("A sleepy hound", "dog")]
INSTRUCTION = "Which words come next?"


@pytest.fixture(scope="module")
def server(engine: lmx.Engine) -> Iterator[BackgroundServer]:
    settings = ServerSettings(
        strict_model_names=True,
        port=0,
        model_name="tiny",
        api_key=KEY,
        max_classify_texts=MAX_TEXTS,
        max_classify_labels=MAX_LABELS,
    )
    with BackgroundServer(settings, engine) as server:
        yield server


@pytest.fixture(scope="module")
def http(server: BackgroundServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def remote(server: BackgroundServer) -> Iterator[RemoteBackend]:
    with RemoteBackend(server.url, api_key=KEY, model="tiny") as remote:
        yield remote


def scores(results: list[lmx.Classification] | list[dict[str, Any]], key: str = "scores") -> np.ndarray:
    rows = [r[key] if isinstance(r, dict) else getattr(r, key) for r in results]
    return np.array([[row[label] for label in LABELS] for row in rows])


def test_scores_over_http_equal_the_engine(http: httpx.Client, engine: lmx.Engine) -> None:
    want = engine.classify(TEXTS, LABELS, instruction=INSTRUCTION, examples=EXAMPLES, max_text_tokens=4)
    want_tokens = engine.metrics.prompt_tokens
    body = {
        "model": "tiny",
        "texts": TEXTS,
        "labels": LABELS,
        "instruction": INSTRUCTION,
        "examples": [{"text": t, "label": label} for t, label in EXAMPLES],
        "max_text_tokens": 4,
    }
    r = http.post("/v1/classify", json=body)
    assert r.status_code == 200, r.text
    reply = r.json()
    assert reply["object"] == "classification.list" and reply["model"] == "tiny"
    data = reply["data"]
    assert [d["index"] for d in data] == [0, 1, 2]
    assert [d["label"] for d in data] == [w.label for w in want]
    assert [d["truncated"] for d in data] == [w.truncated for w in want]
    assert any(w.truncated for w in want)  # max_text_tokens=4 cuts the longer texts
    np.testing.assert_allclose(scores(data), scores(want), atol=1e-6, rtol=0)
    np.testing.assert_allclose(scores(data, "logprobs"), scores(want, "logprobs"), atol=1e-6, rtol=0)
    assert np.allclose(scores(data).sum(axis=1), 1.0)
    assert reply["usage"]["prompt_tokens"] == want_tokens > 0
    assert reply["usage"]["total_tokens"] == want_tokens
    assert reply["metrics"]["prompt_tokens"] == want_tokens


def test_defaults_and_chat_template_kwargs_equal_the_engine(http: httpx.Client, engine: lmx.Engine) -> None:
    want = engine.classify(TEXTS[:2], LABELS, chat_template_kwargs={"enable_thinking": False})
    body = {"model": "tiny", "texts": TEXTS[:2], "labels": LABELS, "chat_template_kwargs": {"enable_thinking": False}}
    data = http.post("/v1/classify", json=body).json()["data"]
    np.testing.assert_allclose(scores(data), scores(want), atol=1e-6, rtol=0)


def test_remote_backend_classify_equals_the_engine(remote: RemoteBackend, engine: lmx.Engine) -> None:
    assert isinstance(remote, lmx.Backend)
    want = engine.classify(TEXTS, LABELS, instruction=INSTRUCTION, examples=EXAMPLES)
    want_tokens = engine.metrics.prompt_tokens
    got = remote.classify(TEXTS, LABELS, instruction=INSTRUCTION, examples=EXAMPLES, batch_size=1)
    assert all(isinstance(g, lmx.Classification) for g in got)
    assert [(g.label, g.truncated) for g in got] == [(w.label, w.truncated) for w in want]
    np.testing.assert_allclose(scores(got), scores(want), atol=1e-6, rtol=0)
    np.testing.assert_allclose(scores(got, "logprobs"), scores(want, "logprobs"), atol=1e-6, rtol=0)
    assert remote.metrics.prompt_tokens == want_tokens
    # dict examples too, and a 400 becomes the engine's error type
    again = remote.classify(TEXTS[:1], LABELS, examples=[{"text": "A sleepy hound", "label": "dog"}])
    assert again[0].label == engine.classify(TEXTS[:1], LABELS, examples=[("A sleepy hound", "dog")])[0].label
    with pytest.raises(InvalidOptionError, match="duplicates"):
        remote.classify(TEXTS, ["dog", "dog"])


def test_classify_runs_while_a_stream_is_open(http: httpx.Client, engine: lmx.Engine) -> None:
    """A classify request sent while a completion streams (its connection open, read only to its
    first chunk) is answered; both give what they give alone."""
    prompt = "The quick brown fox"
    alone = engine.generate(prompt, max_tokens=40).text
    want = engine.classify(TEXTS, LABELS, instruction=INSTRUCTION)
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 40, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as stream:
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        r = http.post("/v1/classify", json={**OK, "instruction": INSTRUCTION})
        assert r.status_code == 200, r.text
        rest = [line for line in lines if line.startswith("data: ")]
    np.testing.assert_allclose(scores(r.json()["data"]), scores(want), atol=1e-6, rtol=0)
    assert rest[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in [first, *rest[:-1]]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == alone


def test_no_texts_is_an_empty_list(http: httpx.Client, remote: RemoteBackend) -> None:
    reply = http.post("/v1/classify", json={"model": "tiny", "texts": [], "labels": LABELS}).json()
    assert reply["data"] == [] and reply["usage"]["prompt_tokens"] == 0
    assert remote.classify([], LABELS) == []


OK = {"model": "tiny", "texts": TEXTS, "labels": LABELS}


@pytest.mark.parametrize(
    ("change", "param", "words"),
    [
        ({"labels": []}, "labels", "labels is empty"),
        ({"labels": ["dog", "cat", "dog"]}, "labels", "duplicates"),
        ({"labels": ["dog", " "]}, "labels", "labels[1] is empty"),
        ({"labels": "dog"}, "labels", "valid array"),
        ({"labels": ["dog", 3]}, "labels[1]", "valid string"),
        ({"examples": [{"text": "a dog", "label": "cat"}]}, "examples[0].label", "not one of the labels"),
        ({"examples": [{"text": " ", "label": "dog"}]}, "examples[0].text", "empty"),
        ({"examples": [{"text": "a dog"}]}, "examples[0].label", "missing"),
        ({"texts": ["fine", 7]}, "texts[1]", "valid string"),
        ({"texts": ["fine", None]}, "texts[1]", "valid string"),
        ({"texts": "one text"}, "texts", "valid array"),
        ({"texts": ["fine", "\n "]}, "texts[1]", "empty"),
        ({"texts": ["t"] * (MAX_TEXTS + 1)}, "texts", f"at most {MAX_TEXTS}"),
        ({"labels": [f"l{i}" for i in range(MAX_LABELS + 1)]}, "labels", f"at most {MAX_LABELS}"),
        ({"max_text_tokens": 0}, "max_text_tokens", ">= 1"),
        ({"max_text_tokens": "8"}, "max_text_tokens", "valid integer"),
        ({"instruction": 5}, "instruction", "valid string"),
        ({"batch_size": 8}, "batch_size", "unrecognized"),
        ({"chat_template_kwargs": {"chat_template": "{{ 1 }}"}}, "chat_template_kwargs.chat_template", "does not let"),
    ],
)
def test_bad_input_is_400_naming_the_field(http: httpx.Client, change: dict, param: str, words: str) -> None:
    r = http.post("/v1/classify", json={**OK, **change})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["code"] == "invalid_parameter"
    assert words in error["message"]


def test_missing_field_unknown_model_and_wrong_method(http: httpx.Client) -> None:
    r = http.post("/v1/classify", json={"model": "tiny", "texts": TEXTS})
    assert r.status_code == 400 and r.json()["error"]["param"] == "labels"
    r = http.post("/v1/classify", json={**OK, "model": "nope"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert http.get("/v1/classify").status_code == 405


def test_api_key_is_required(server: BackgroundServer) -> None:
    r = httpx.post(server.url + "/v1/classify", json=OK)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(server.url + "/v1/classify", json=OK, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    with RemoteBackend(server.url, api_key="wrong", model="tiny") as bad, pytest.raises(lmx.LmxError, match="401"):
        bad.classify(TEXTS, LABELS)


def test_readme_curl_example_runs(server: BackgroundServer, engine: lmx.Engine) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    (command,) = re.findall(r"### Classify over HTTP.*?```sh\n(.*?)```", readme, flags=re.S)
    command = command.replace("http://127.0.0.1:8090", server.url).replace("Bearer secret", f"Bearer {KEY}")
    command = command.replace('"gemma-3-270m-q4_k_m"', '"tiny"')
    out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120, check=True).stdout
    reply = json.loads(out)
    body = json.loads(re.search(r"-d '(.*)'", command, flags=re.S).group(1))
    examples = [(e["text"], e["label"]) for e in body.get("examples", [])]
    want = engine.classify(body["texts"], body["labels"], examples=examples, max_text_tokens=body["max_text_tokens"])
    assert [d["label"] for d in reply["data"]] == [w.label for w in want]
    got = [[d["scores"][label] for label in body["labels"]] for d in reply["data"]]
    np.testing.assert_allclose(got, [[w.scores[label] for label in body["labels"]] for w in want], atol=1e-6)


@pytest.mark.parametrize("name", ["max_classify_texts", "max_classify_labels"])
def test_classify_limits_are_checked_settings(name: str) -> None:
    with pytest.raises(InvalidOptionError, match=name):
        ServerSettings(**{name: 0})

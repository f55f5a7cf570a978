"""Structured output on the real bundled Gemma 3 270M through a live server: OpenAI
``response_format`` (json_schema, json_object) and lmx's ``grammar`` with the official ``openai``
client, Ollama ``format`` with the official ``ollama`` client; sampled and greedy, streamed and
not; every output validates against its schema (``jsonschema``). Bad schemas and grammars are
400s naming the field and the feature."""

from __future__ import annotations

import lmx  # isort: skip

import json
import re
from collections.abc import Iterator

import httpx
import jsonschema
import ollama
import openai
import pytest

from lmx.generate.constraints import token_bytes
from lmx.server import BackgroundServer, ServerSettings

pytestmark = pytest.mark.slow

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "population": {"type": "integer", "minimum": 0, "maximum": 100_000_000},
        "size": {"enum": ["small", "medium", "large"]},
        "sights": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
    },
    "required": ["city", "population", "size", "sights"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Describe Paris as JSON with city, population, size and sights."}]
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def engine() -> Iterator[lmx.Engine]:
    with lmx.load() as engine:  # the bundled Gemma 3 270M
        yield engine


@pytest.fixture(scope="module")
def server(engine: lmx.Engine) -> Iterator[BackgroundServer]:
    with BackgroundServer(ServerSettings(port=0, model_name="gemma"), engine) as server:
        yield server


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="not-needed", max_retries=0) as client:
        yield client


def test_byte_table_of_the_sentencepiece_vocabulary(engine: lmx.Engine) -> None:
    tok = engine.tokenizer
    table, _ = token_bytes(tok, engine.model.args.vocab_size)
    for text in ["  Hello,   world!\n\n", "naïve café — 日本語 🙂 \U0001f9ec", '{"a": [1, 2]}']:
        ids = tok.encode(text, add_special_tokens=False)
        assert b"".join(table[i] for i in ids) == text.encode("utf-8")


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_greedy_and_sampled_validate(client: openai.OpenAI, stream: bool) -> None:
    settings = [{"temperature": 0}] + [{"temperature": 1.0, "seed": seed} for seed in range(3)]
    for extra in settings:
        kwargs = {"model": "gemma", "messages": MESSAGES, "max_tokens": 200, "response_format": RESPONSE_FORMAT}
        if stream:
            chunks = list(client.chat.completions.create(**kwargs, **extra, stream=True))  # type: ignore[call-overload]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            assert finish == ["stop"], text
        else:
            reply = client.chat.completions.create(**kwargs, **extra)  # type: ignore[call-overload]
            text = reply.choices[0].message.content
            assert reply.choices[0].finish_reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_and_text(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="gemma", messages=MESSAGES, max_tokens=150, response_format={"type": "json_object"}
    )
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    else:  # out of tokens inside the object: still a prefix of one
        assert reply.choices[0].message.content.startswith("{")
    plain = client.chat.completions.create(
        model="gemma", messages=MESSAGES, max_tokens=5, response_format={"type": "text"}
    )
    direct = client.chat.completions.create(model="gemma", messages=MESSAGES, max_tokens=5)
    assert plain.choices[0].message.content == direct.choices[0].message.content


def test_grammar_extension_on_chat_and_completions(client: openai.OpenAI) -> None:
    regex = r"(yes|no), because [a-z ]{5,40}\."
    reply = client.chat.completions.create(
        model="gemma",
        messages=[{"role": "user", "content": "Is Paris in France?"}],
        max_tokens=60,
        extra_body={"grammar": {"type": "regex", "value": regex}},
    )
    assert re.fullmatch(regex, reply.choices[0].message.content) and reply.choices[0].finish_reason == "stop"
    lark = 'start: "The answer is " NUMBER "."\nNUMBER: /[0-9]{1,4}/'
    chunks = list(
        client.completions.create(
            model="gemma", prompt="Six times seven:", max_tokens=20, stream=True, temperature=0.8, seed=1,
            extra_body={"grammar": {"type": "lark", "value": lark}},
        )
    )  # fmt: skip
    text = "".join(c.choices[0].text for c in chunks)
    assert re.fullmatch(r"The answer is [0-9]{1,4}\.", text), text


@pytest.mark.parametrize("stream", [False, True])
def test_ollama_format_schema_and_json(server: BackgroundServer, stream: bool) -> None:
    client = ollama.Client(host=server.url)
    for options in ({"temperature": 0}, {"temperature": 1.0, "seed": 7}):
        result = client.chat(
            model="gemma", messages=MESSAGES, format=SCHEMA, stream=stream, options={**options, "num_predict": 200}
        )
        parts = list(result) if stream else [result]
        text = "".join(p.message.content for p in parts)
        assert parts[-1].done_reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
    reply = client.generate(
        model="gemma", prompt="Give a JSON object about Rome.", format="json", options={"num_predict": 150}
    )
    assert reply.response.startswith("{")
    if reply.done_reason == "stop":
        assert isinstance(json.loads(reply.response), dict)


@pytest.mark.parametrize(
    ("schema", "feature"),
    [
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired"),
        ({"type": "string", "format": "no-such-format"}, "no-such-format"),
    ],
)
def test_unsupported_schema_is_400_naming_it(
    client: openai.OpenAI, server: BackgroundServer, schema: dict, feature: str
) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "bad", "schema": schema, "strict": True}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="gemma", messages=MESSAGES, max_tokens=5, response_format=bad)
    assert e.value.body["param"] == "response_format" and feature in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:  # streaming too: refused before anything streams
        client.chat.completions.create(model="gemma", messages=MESSAGES, max_tokens=5, response_format=bad, stream=True)
    assert e.value.body["param"] == "response_format"
    r = httpx.post(server.url + "/api/chat", json={"model": "gemma", "messages": MESSAGES, "format": schema})
    assert r.status_code == 400 and feature in r.json()["error"]


def test_remote_backend_sends_any_constraint(server: BackgroundServer, engine: lmx.Engine) -> None:
    remote = lmx.RemoteBackend(server.url)
    regex = r"(red|green|blue), [0-9]{2}"
    reply = remote.generate("My favourite colour and number:", constraint=lmx.Constraint.regex(regex), max_tokens=12)
    local = engine.generate("My favourite colour and number:", constraint=lmx.Constraint.regex(regex), max_tokens=12)
    assert re.fullmatch(regex, reply.text) and reply.text == local.text
    small = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    answer = remote.chat(MESSAGES, constraint=lmx.Constraint.json(small), max_tokens=20)
    assert json.loads(answer.text) in ({"ok": True}, {"ok": False})

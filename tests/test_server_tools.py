"""Tool calls through the server, driven by the real ``openai`` and ``ollama`` clients against a
live server. The model is a tiny scripted checkpoint (tests/scripted_model.py): it really writes
the text of a call (or of a plain answer), picked by ``logit_bias``, and the server must turn it
into ``tool_calls``."""

from __future__ import annotations

import lmx  # isort: skip

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import ollama
import openai
import pytest

from lmx.errors import InvalidOptionError
from lmx.models.gemma3_text import CHAT_TEMPLATE as GEMMA3_TEMPLATE
from lmx.models.qwen3 import CHAT_TEMPLATE as QWEN3_TEMPLATE
from lmx.server import BackgroundServer, ServerSettings
from lmx.tokenizer import load_tokenizer
from scripted_model import save_scripted

QWEN_SCRIPTS = {
    "call": ['<tool_call>\n{"name": "get_weather", ', '"arguments": {"city": "Paris"}}\n</tool_call>'],
    "two": [
        "Let me check.\n",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>\n',
        '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>',
    ],
    "plain": ["The answer", " is 42."],
    "broken": ['<tool_call>\n{"name": broken}\n</tool_call>'],
    "inside": ['{"name": "get_time", "arguments": {"zone": "UTC"}}', "\n</tool_call>"],  # after a forced opening
}
GEMMA_SCRIPTS = {
    "call": ['```tool_call\n{"name": "get_weather", "arguments": ', '{"city": "Oslo"}}\n```'],
    "plain": ["Sunny", " today."],
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}},
}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "Weather in Paris?"}]
GREEDY: dict[str, Any] = {"model": "tiny", "temperature": 0, "max_tokens": 12}


@pytest.fixture(scope="module")
def starts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("scripted")
    return {
        "qwen": save_scripted(root / "qwen", QWEN_SCRIPTS, "call", QWEN3_TEMPLATE),
        "gemma": save_scripted(root / "gemma", GEMMA_SCRIPTS, "call", GEMMA3_TEMPLATE, bos="<bos>"),
        "dirs": {"qwen": root / "qwen", "gemma": root / "gemma"},
    }


@pytest.fixture(scope="module")
def servers(starts: dict[str, Any]) -> Iterator[dict[str, BackgroundServer]]:
    dirs: dict[str, Path] = starts["dirs"]
    with (
        lmx.load(dirs["qwen"]) as qwen,
        lmx.load(dirs["gemma"]) as gemma,
        BackgroundServer(ServerSettings(port=0, model_name="tiny"), qwen) as s1,
        BackgroundServer(ServerSettings(port=0, model_name="tiny"), gemma) as s2,
    ):
        yield {"qwen": s1, "gemma": s2}


@pytest.fixture(scope="module")
def client(servers: dict[str, BackgroundServer]) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=servers["qwen"].url + "/v1", api_key="-", max_retries=0) as client:
        yield client


def _bias(starts: dict[str, Any], script: str, style: str = "qwen") -> dict[str, int]:
    return {str(starts[style][script]): 50}


def _calls(calls: Any) -> list[tuple[str, Any]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in calls or []]


def _stream(client: openai.OpenAI, **kwargs: Any) -> tuple[str | None, list[tuple[str, Any]], list[Any], list[Any]]:
    """Content, calls (joined by index, as OpenAI clients do), finish reasons and chunks of a stream."""
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    content, calls, finishes = None, {}, []
    for chunk in chunks:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        if delta.content:
            content = (content or "") + delta.content
        for call in delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"id": call.id, "name": "", "arguments": ""})
            entry["name"] += call.function.name or ""
            entry["arguments"] += call.function.arguments or ""
            assert call.type == "function" and call.id.startswith("call_")
        if chunk.choices[0].finish_reason:
            finishes.append(chunk.choices[0].finish_reason)
    joined = [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())]
    return content, joined, finishes, chunks


def test_a_call_in_the_reply_is_returned_as_tool_calls(client: openai.OpenAI, starts: dict[str, Any]) -> None:
    out = client.chat.completions.create(messages=ASK, tools=TOOLS, **GREEDY)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert _calls(choice.message.tool_calls) == [("get_weather", {"city": "Paris"})]
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_") and len(call.id) == 29

    content, calls, finishes, chunks = _stream(client, messages=ASK, tools=TOOLS, **GREEDY)
    assert content is None and calls == [("get_weather", {"city": "Paris"})] and finishes == ["tool_calls"]
    assert chunks[0].choices[0].delta.role == "assistant"


def test_text_and_several_calls_stream_as_they_parse_whole(client: openai.OpenAI, starts: dict[str, Any]) -> None:
    kwargs = dict(messages=ASK, tools=TOOLS, logit_bias=_bias(starts, "two"), parallel_tool_calls=True, **GREEDY)
    out = client.chat.completions.create(**kwargs)
    expected = [("get_weather", {"city": "Rome"}), ("get_time", {"zone": "CET"})]
    assert out.choices[0].message.content == "Let me check.\n"
    assert _calls(out.choices[0].message.tool_calls) == expected
    assert out.choices[0].finish_reason == "tool_calls"
    content, calls, finishes, chunks = _stream(client, stream_options={"include_usage": True}, **kwargs)
    assert (content, calls, finishes) == ("Let me check.\n", expected, ["tool_calls"])
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens
    indexes = [c.index for ch in chunks if ch.choices for c in ch.choices[0].delta.tool_calls or []]
    assert indexes == [0, 1]


def test_plain_and_malformed_replies_stay_text(client: openai.OpenAI, starts: dict[str, Any]) -> None:
    for script, text in (("plain", "The answer is 42."), ("broken", QWEN_SCRIPTS["broken"][0])):
        kwargs = dict(messages=ASK, tools=TOOLS, logit_bias=_bias(starts, script), **GREEDY)
        out = client.chat.completions.create(**kwargs)
        assert out.choices[0].message.content == text
        assert out.choices[0].message.tool_calls is None and out.choices[0].finish_reason == "stop"
        assert _stream(client, **kwargs)[:3] == (text, [], ["stop"])


def test_tool_choice_none_renders_no_tools_and_parses_nothing(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(messages=ASK, tools=TOOLS, tool_choice="none", **GREEDY)
    plain = client.chat.completions.create(messages=ASK, **GREEDY)
    assert out.usage.prompt_tokens == plain.usage.prompt_tokens  # the tools were not in the prompt
    with_tools = client.chat.completions.create(messages=ASK, tools=TOOLS, **GREEDY)
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens
    assert out.choices[0].message.tool_calls is None and out.choices[0].finish_reason == "stop"
    assert out.choices[0].message.content == "".join(QWEN_SCRIPTS["call"])


def test_required_and_named_tool_choice_open_a_call(
    client: openai.OpenAI, servers: dict[str, BackgroundServer], starts: dict[str, Any]
) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    for choice in ("required", named):
        # Constrained decoding writes the call against the tools' schemas, token by token (the
        # scripted model's one-token piece cannot start it: llguidance forces the canonical
        # tokens of the call's fixed opening), so the call is valid, not the script's text.
        kwargs = dict(messages=ASK, tools=TOOLS, tool_choice=choice, logit_bias=_bias(starts, "inside"), **GREEDY)
        kwargs["max_tokens"] = 80
        out = client.chat.completions.create(**kwargs)
        calls = _calls(out.choices[0].message.tool_calls)
        assert len(calls) == 1 and out.choices[0].finish_reason == "tool_calls", choice
        name, arguments = calls[0]
        schema = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
        assert name in schema and (name == "get_time" or choice == "required")
        jsonschema.validate(arguments, schema[name])
        assert _stream(client, **kwargs)[1:3] == (calls, ["tool_calls"])
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_stock"}}, **GREEDY
        )
    body = err.value.body
    assert body["param"] == "tool_choice" and "'get_stock'" in body["message"] and "get_weather" in body["message"]
    r = httpx.post(
        servers["qwen"].url + "/v1/chat/completions", json={**GREEDY, "messages": ASK, "tool_choice": "auto"}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"


def test_follow_up_turn_with_tool_results(
    client: openai.OpenAI, servers: dict[str, BackgroundServer], starts: dict[str, Any]
) -> None:
    first = client.chat.completions.create(messages=ASK, tools=TOOLS, **GREEDY)
    call = first.choices[0].message.tool_calls[0]
    messages = [
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
    ]
    out = client.chat.completions.create(messages=messages, tools=TOOLS, logit_bias=_bias(starts, "plain"), **GREEDY)
    assert out.choices[0].message.content == "The answer is 42."
    # The server rendered the call and its result as the template does.
    tok = load_tokenizer(starts["dirs"]["qwen"])
    prompt = tok.apply_chat_template(
        [*ASK, {"role": "assistant", "content": "", "tool_calls": [call.model_dump()]}, messages[2]],
        add_generation_prompt=True,
        tools=TOOLS,
    )
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert '<tool_response>\n{"temp": 21}\n</tool_response>' in prompt
    assert out.usage.prompt_tokens == len(tok.encode(prompt, add_special_tokens=False))


def test_gemma_convention_through_the_server(servers: dict[str, BackgroundServer], starts: dict[str, Any]) -> None:
    with openai.OpenAI(base_url=servers["gemma"].url + "/v1", api_key="-", max_retries=0) as client:
        out = client.chat.completions.create(messages=ASK, tools=TOOLS, **GREEDY)
        assert _calls(out.choices[0].message.tool_calls) == [("get_weather", {"city": "Oslo"})]
        assert out.choices[0].message.content is None and out.choices[0].finish_reason == "tool_calls"
        assert _stream(client, messages=ASK, tools=TOOLS, **GREEDY)[:3] == (
            None,
            [("get_weather", {"city": "Oslo"})],
            ["tool_calls"],
        )
        call = out.choices[0].message.tool_calls[0]
        follow = [
            *ASK,
            out.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "12 C"},
        ]
        bias = _bias(starts, "plain", "gemma")
        reply = client.chat.completions.create(messages=follow, tools=TOOLS, logit_bias=bias, **GREEDY)
        assert reply.choices[0].message.content == "Sunny today." and reply.choices[0].finish_reason == "stop"


def test_engine_chat_returns_tool_calls(starts: dict[str, Any]) -> None:
    with lmx.load(starts["dirs"]["gemma"]) as engine:
        done = engine.chat(ASK, tools=TOOLS, max_tokens=12)
        assert done.text == "" and [(c.name, json.loads(c.arguments)) for c in done.tool_calls] == [
            ("get_weather", {"city": "Oslo"})
        ]
        plain = engine.chat(ASK, max_tokens=12)
        assert plain.tool_calls == [] and "tool_call" in plain.text  # without tools nothing is parsed
        with pytest.raises(InvalidOptionError, match="tool_choice names function 'nope'"):
            engine.chat(ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})


def test_ollama_client_tools(servers: dict[str, BackgroundServer]) -> None:
    client = ollama.Client(host=servers["qwen"].url)
    opts = {"temperature": 0, "num_predict": 12}
    out = client.chat(model="tiny", messages=ASK, tools=TOOLS, options=opts)
    calls = out.message.tool_calls
    assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert out.message.content == "" and out.done
    streamed = [c for chunk in client.chat(model="tiny", messages=ASK, tools=TOOLS, options=opts, stream=True)
                for c in chunk.message.tool_calls or []]  # fmt: skip
    assert [(c.function.name, dict(c.function.arguments)) for c in streamed] == [("get_weather", {"city": "Paris"})]
    follow = [
        *ASK,
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_name": "get_weather", "content": "21 C"},
    ]  # fmt: skip
    again = client.chat(model="tiny", messages=follow, tools=TOOLS, options=opts)
    assert again.message.tool_calls  # the scripted model calls again; the follow-up rendered without error
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="tiny", messages=ASK, tools=[{"type": "function", "function": {"name": "bad name"}}])
    assert err.value.status_code == 400 and "bad name" in err.value.error


def test_malformed_tool_turns_in_messages_are_400(servers: dict[str, BackgroundServer]) -> None:
    url = servers["qwen"].url + "/v1/chat/completions"
    for calls, param in (
        ("get_weather", "messages[1]"),
        ([{"function": {"arguments": "{}"}}], "messages[1].tool_calls"),
    ):
        messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": calls}]
        r = httpx.post(url, json={**GREEDY, "messages": messages, "tools": TOOLS})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_concurrent_rows_each_get_their_own_calls(client: openai.OpenAI, starts: dict[str, Any]) -> None:
    """Requests with and without tools, different scripts, logprobs, streamed or not, decoded together."""
    from concurrent.futures import ThreadPoolExecutor

    two = [("get_weather", {"city": "Rome"}), ("get_time", {"zone": "CET"})]
    cases = [
        (dict(tools=TOOLS), False, (None, [("get_weather", {"city": "Paris"})])),
        (dict(tools=TOOLS, logit_bias=_bias(starts, "two")), True, ("Let me check.\n", two)),
        (dict(tools=TOOLS, logit_bias=_bias(starts, "plain"), logprobs=True), False, ("The answer is 42.", [])),
        (dict(), True, ("".join(QWEN_SCRIPTS["call"]), [])),  # no tools: the same text stays text
        (dict(tools=TOOLS, logit_bias=_bias(starts, "two"), logprobs=True, top_logprobs=2), False, ("Let me check.\n", two)),
    ] * 2  # fmt: skip

    def run(case: tuple[dict[str, Any], bool, Any]) -> tuple[Any, list[Any]]:
        extra, stream, _ = case
        if stream:
            return _stream(client, messages=ASK, **extra, **GREEDY)[:2]
        message = client.chat.completions.create(messages=ASK, **extra, **GREEDY).choices[0].message
        return message.content, _calls(message.tool_calls)

    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(run, cases))
    assert results == [expected for _, _, expected in cases]

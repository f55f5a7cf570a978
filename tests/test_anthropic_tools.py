"""Anthropic <-> OpenAI conversions of the Messages API (no model needed): tool definitions,
tool_choice, tool_use / tool_result blocks, parsed calls as reply blocks and stream events,
and the request's messages as engine messages."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

import pytest

from lmx.server.anthropic_tools import (
    openai_tool_choice,
    openai_tools,
    reply_content,
    tool_calling,
    tool_result_messages,
    tool_use_events,
    tool_use_message,
)
from lmx.server.errors import ApiRequestError, UnsupportedParameterError
from lmx.server.schemas_anthropic import MessagesRequest, engine_messages, uses_tools

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@dataclass(frozen=True)
class Call:  # the shape of lmx.generate.tools.ToolCall
    id: str
    name: str
    arguments: str


def request(messages: list[dict[str, Any]], **fields: Any) -> MessagesRequest:
    return MessagesRequest.model_validate({"model": "m", "max_tokens": 8, "messages": messages, **fields})


def test_tool_definitions_become_openai_functions() -> None:
    assert openai_tools([WEATHER, {"name": "now", "input_schema": {"type": "object"}, "type": "custom"}]) == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": WEATHER["input_schema"],
                "description": "The weather in a city.",
            },
        },
        {"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}},
    ]
    with pytest.raises(UnsupportedParameterError, match="web_search_20250305") as e:
        openai_tools([WEATHER, {"type": "web_search_20250305", "name": "web_search"}])
    assert e.value.param == "tools[1].type"
    with pytest.raises(ApiRequestError, match="input_schema") as e:
        openai_tools([{"name": "f", "input_schema": "object"}])
    assert e.value.param == "tools[0].input_schema"
    with pytest.raises(ApiRequestError, match="name"):
        openai_tools([{"input_schema": {}}])


def test_tool_choice_becomes_openai_tool_choice() -> None:
    names = ["get_weather"]
    assert openai_tool_choice(None, names) == ("auto", True)
    assert openai_tool_choice({"type": "auto"}, names) == ("auto", True)
    assert openai_tool_choice({"type": "any", "disable_parallel_tool_use": True}, names) == ("required", False)
    assert openai_tool_choice({"type": "none"}, names) == ("none", True)
    named = openai_tool_choice({"type": "tool", "name": "get_weather"}, names)
    assert named == ({"type": "function", "function": {"name": "get_weather"}}, True)
    with pytest.raises(ApiRequestError, match="'nope' names no tool") as e:
        openai_tool_choice({"type": "tool", "name": "nope"}, names)
    assert e.value.param == "tool_choice.name"
    with pytest.raises(ApiRequestError, match="auto, any, tool, none"):
        openai_tool_choice({"type": "sometimes"}, names)


def test_tool_use_and_tool_result_blocks_become_openai_messages() -> None:
    use = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Zürich"}}
    message = tool_use_message("Let me look.", [use], "messages[1].content")
    assert message == {
        "role": "assistant",
        "content": "Let me look.",
        "tool_calls": [
            {
                "id": "toolu_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'},
            }
        ],
    }
    with pytest.raises(ApiRequestError, match="input must be an object"):
        tool_use_message("", [{**use, "input": [1]}], "m")
    results = [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "12 C"},
        {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "a"}], "is_error": True},
        {"type": "tool_result", "tool_use_id": "toolu_3"},
    ]
    assert tool_result_messages(results, "m") == [
        {"role": "tool", "tool_call_id": "toolu_1", "content": "12 C"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: a"},
        {"role": "tool", "tool_call_id": "toolu_3", "content": ""},
    ]
    with pytest.raises(UnsupportedParameterError, match="'document'"):
        tool_result_messages([{"tool_use_id": "t", "content": [{"type": "document"}]}], "m")
    with pytest.raises(ApiRequestError, match=r"m.content\[0\].source must be an object"):
        tool_result_messages([{"tool_use_id": "t", "content": [{"type": "image"}]}], "m")
    with pytest.raises(ApiRequestError, match="tool_use_id"):
        tool_result_messages([{"content": "x"}], "m")


def test_a_conversation_with_tools_becomes_engine_messages() -> None:
    req = request(
        [
            {"role": "user", "content": "Weather in Zürich?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Looking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Zürich"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "12 C"},
                    {"type": "text", "text": "And tomorrow?"},
                ],
            },
        ],
        system="Be brief.",
    )
    messages = engine_messages(req)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "user"]
    assert messages[2]["tool_calls"][0]["function"]["arguments"] == '{"city": "Zürich"}'
    assert messages[3] == {"role": "tool", "tool_call_id": "toolu_1", "content": "12 C"}
    assert messages[4] == {"role": "user", "content": "And tomorrow?"}
    assert uses_tools(messages)
    assert not uses_tools(engine_messages(request([{"role": "user", "content": "hi"}])))


def test_text_blocks_and_same_role_messages_are_joined() -> None:
    req = request(
        [
            {"role": "user", "content": [{"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}}]},
            {"role": "user", "content": [{"type": "text", "text": "b"}, {"type": "text", "text": "c"}]},
            {"role": "assistant", "content": "d"},
        ],
        system=[{"type": "text", "text": "s1"}, {"type": "text", "text": "s2"}],
    )
    assert engine_messages(req) == [
        {"role": "system", "content": "s1\n\ns2"},
        {"role": "user", "content": "a\n\nb\n\nc"},
        {"role": "assistant", "content": "d"},
    ]


PNG = b"\x89PNG\r\n\x1a\n" + b"rest of the file"  # only the signature is read here; the engine decodes


def image(data: bytes = PNG) -> dict[str, Any]:
    return {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": base64.b64encode(data).decode()},
    }


def test_image_blocks_become_image_parts_in_place() -> None:
    req = request(
        [
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}, image()]},
            {"role": "user", "content": [{"type": "text", "text": "c"}]},
            {"role": "assistant", "content": "d"},
            {"role": "user", "content": [{"type": "text", "text": "e"}]},
            {"role": "user", "content": [image(), {"type": "text", "text": "f"}]},
        ]
    )
    part = {"type": "image", "image": PNG}
    assert engine_messages(req) == [
        {"role": "user", "content": [{"type": "text", "text": "a\n\nb"}, part, {"type": "text", "text": "c"}]},
        {"role": "assistant", "content": "d"},
        {"role": "user", "content": [{"type": "text", "text": "e"}, part, {"type": "text", "text": "f"}]},
    ]
    results = tool_result_messages(
        [{"tool_use_id": "t", "content": [{"type": "text", "text": "x"}, image()], "is_error": True}], "m"
    )
    assert results == [{"role": "tool", "tool_call_id": "t", "content": [{"type": "text", "text": "Error: x"}, part]}]
    assert tool_result_messages([{"tool_use_id": "t", "content": [image()], "is_error": True}], "m")[0]["content"] == [
        {"type": "text", "text": "Error: "},
        part,
    ]


@pytest.mark.parametrize(
    ("source", "param", "says"),
    [
        ({"type": "url", "url": "https://x/y.png"}, "source.type", "never fetches image URLs"),
        ({"type": "file", "file_id": "f"}, "source.type", "no Files API"),
        ({"type": "base64", "media_type": "image/tiff", "data": "AAAA"}, "source.media_type", "'image/tiff'"),
        ({"type": "base64", "media_type": "image/png", "data": "!!"}, "source.data", "not valid base64"),
        (
            {"type": "base64", "media_type": "image/gif", "data": base64.b64encode(PNG).decode()},
            "source.media_type",
            "is image/png data, but media_type says image/gif",
        ),
    ],
)
def test_bad_image_sources_name_the_field(source: dict[str, Any], param: str, says: str) -> None:
    with pytest.raises(ApiRequestError, match=says) as e:
        engine_messages(request([{"role": "user", "content": [{"type": "image", "source": source}]}]))
    assert e.value.param == f"messages[0].content[0].{param}"
    assert isinstance(e.value, UnsupportedParameterError) == (source["type"] in ("url", "file"))


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ({"role": "system", "content": "x"}, "messages[0].role"),
        ({"role": "user", "content": 5}, "messages[0].content"),
        ({"role": "user", "content": [{"type": "image", "source": {}}]}, "messages[0].content[0].source.type"),
        ({"role": "user", "content": [{"type": "document", "source": {}}]}, "messages[0].content[0].type"),
        ({"role": "assistant", "content": [{"type": "image", "source": {}}]}, "messages[0].content[0].type"),
        ({"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f"}]}, "messages[0].content[0].type"),
        ({"role": "user", "content": "x", "name": "bob"}, "messages[0].name"),
    ],
)
def test_bad_messages_name_the_field(message: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiRequestError) as e:
        engine_messages(request([message]))
    assert e.value.param == param


def test_parsed_calls_become_tool_use_blocks() -> None:
    calls = [Call("call_1", "get_weather", '{"city": "Paris"}'), Call("call_2", "bad", "[1, 2]")]
    content, stop = reply_content("", calls, "end_turn")
    assert stop == "tool_use"
    assert content == [{"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}}]
    content, stop = reply_content("Sure.", calls[:1], "max_tokens")
    assert [b["type"] for b in content] == ["text", "tool_use"] and stop == "tool_use"
    assert reply_content("Hi.", [], "end_turn") == ([{"type": "text", "text": "Hi."}], "end_turn")
    assert reply_content("", [calls[1]], "end_turn") == ([{"type": "text", "text": ""}], "end_turn")


def test_tool_use_stream_events() -> None:
    block = {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}}
    events = tool_use_events(1, block)
    assert [e["type"] for e in events] == ["content_block_start", "content_block_delta", "content_block_stop"]
    assert events[0]["content_block"] == {**block, "input": {}}
    assert all(e["index"] == 1 for e in events)
    assert events[1]["delta"]["type"] == "input_json_delta"
    assert json.loads(events[1]["delta"]["partial_json"]) == block["input"]


def test_no_tool_calling_for_an_engine_without_chat_templates() -> None:
    assert tool_calling(object()) is None

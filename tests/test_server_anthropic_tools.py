"""Anthropic tool use end to end: the real ``anthropic`` client against a live server whose model
(tests/scripted_model.py) really writes a Qwen 3 ``<tool_call>``; the server must answer with a
``tool_use`` block, streamed and not, and render ``tool_result`` turns in the follow-up."""

from __future__ import annotations

import lmx  # isort: skip

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import pytest

from lmx.models.qwen3 import CHAT_TEMPLATE as QWEN3_TEMPLATE
from lmx.server import BackgroundServer, ServerSettings
from scripted_model import save_scripted

SCRIPTS = {
    "call": ['<tool_call>\n{"name": "get_weather", ', '"arguments": {"city": "Paris"}}\n</tool_call>'],
    "plain": ["The answer", " is 42."],
}
TOOLS = [
    {
        "name": "get_weather",
        "description": "Current weather in a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }
]
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[anthropic.Anthropic]:
    root: Path = tmp_path_factory.mktemp("scripted") / "qwen"
    save_scripted(root, SCRIPTS, "call", QWEN3_TEMPLATE)
    with (
        lmx.load(root) as engine,
        BackgroundServer(ServerSettings(port=0, model_name="tiny"), engine) as server,
        anthropic.Anthropic(base_url=server.url, api_key="-", max_retries=0) as client,
    ):
        yield client


def _tool_use(content: list[Any]) -> list[tuple[str, Any]]:
    return [(b.name, b.input) for b in content if b.type == "tool_use"]


def test_a_call_comes_back_as_a_tool_use_block(client: anthropic.Anthropic) -> None:
    message = client.messages.create(model="tiny", max_tokens=40, messages=ASK, tools=TOOLS)
    assert message.stop_reason == "tool_use"
    assert _tool_use(message.content) == [("get_weather", {"city": "Paris"})]
    block = next(b for b in message.content if b.type == "tool_use")
    assert block.id.startswith("toolu_") or block.id.startswith("call_")
    assert not any(b.type == "text" and "<tool_call>" in b.text for b in message.content)


def test_a_streamed_call_arrives_as_input_json(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model="tiny", max_tokens=40, messages=ASK, tools=TOOLS) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert "input_json" in kinds
    assert final.stop_reason == "tool_use"
    assert _tool_use(final.content) == [("get_weather", {"city": "Paris"})]


def test_tool_choice_none_leaves_the_reply_as_text(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model="tiny", max_tokens=40, messages=ASK, tools=TOOLS, tool_choice={"type": "none"}
    )
    assert message.stop_reason == "end_turn"
    assert _tool_use(message.content) == []
    assert "<tool_call>" in "".join(b.text for b in message.content if b.type == "text")


def test_tools_and_tool_results_are_rendered(client: anthropic.Anthropic) -> None:
    bare = client.messages.count_tokens(model="tiny", messages=ASK).input_tokens
    with_tools = client.messages.count_tokens(model="tiny", messages=ASK, tools=TOOLS).input_tokens
    assert with_tools > bare  # the template lists the tool
    follow_up = [
        *ASK,
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "18 C, sunny"}]},
    ]
    longer = client.messages.count_tokens(model="tiny", messages=follow_up, tools=TOOLS).input_tokens
    assert longer > with_tools
    reply = client.messages.create(model="tiny", max_tokens=40, messages=follow_up, tools=TOOLS)
    assert reply.stop_reason == "tool_use"  # the scripted model calls again; the turn was accepted

"""Anthropic tool use <-> OpenAI function tools: pure conversions, and the seam where the
Messages route learns whether the engine can run tools.

Conversions (each unit-tested in ``tests/test_anthropic_tools.py``):

- request ``tools`` (``{"name", "description", "input_schema"}``) -> OpenAI function tools
  (``{"type": "function", "function": {"name", "description", "parameters"}}``):
  :func:`openai_tools`; ``tool_choice`` (``auto`` / ``any`` / ``tool`` / ``none``) -> OpenAI's
  (``"auto"`` / ``"required"`` / ``{"type": "function", ...}`` / ``"none"``):
  :func:`openai_tool_choice`;
- assistant ``tool_use`` blocks -> a message with ``tool_calls``: :func:`tool_use_message`;
  user ``tool_result`` blocks -> ``role: "tool"`` messages: :func:`tool_result_messages`;
- parsed calls (objects with ``id``, ``name`` and ``arguments``, the JSON text of the
  arguments: ``lmx.generate.tools.ToolCall``) -> reply ``content`` with ``tool_use`` blocks
  and ``stop_reason: "tool_use"``: :func:`reply_content`; when streaming, the events of each
  ``tool_use`` block (``content_block_start``, one ``input_json_delta``,
  ``content_block_stop``): :func:`tool_use_events`.

The seam: :func:`tool_calling` gives a request's :class:`ToolCalling`: its ``stream_options``
plans the tools as the OpenAI chat route does (:func:`lmx.generate.tools.plan_tools`: the
model's template renders them, Qwen 3 style or lmx's Gemma convention) and returns the keyword
arguments of ``engine.stream_chat``; its ``parse`` reads the calls out of the whole reply with
:func:`lmx.generate.tools.parse_tool_calls`. None for an engine that does not render chat
templates here (a request with tools then gets a 400).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from lmx.generate.tools import ToolPlan, parse_tool_calls, plan_tools
from lmx.server.errors import ApiRequestError, UnsupportedParameterError
from lmx.server.images import anthropic_image_block
from lmx.server.tool_choice import engine_tool_options, request_tools

logger = logging.getLogger(__name__)


class ToolCallLike(Protocol):
    """What a parsed call offers (``lmx.generate.tools.ToolCall``)."""

    id: str
    name: str
    arguments: str  # JSON text


def _default_stream_options(tools: list[dict[str, Any]], choice: Any) -> dict[str, Any]:
    return {"tools": tools, "tool_choice": choice}


@dataclass(frozen=True)
class ToolCalling:
    """How the engine runs tools.

    Attributes:
        parse: ``text -> (text without the calls, calls)``.
        stream_options: ``(openai tools, openai tool_choice) -> keyword arguments of
            engine.stream_chat``.
    """

    parse: Callable[[str], tuple[str, Sequence[ToolCallLike]]]
    stream_options: Callable[[list[dict[str, Any]], Any], dict[str, Any]] = _default_stream_options


def tool_calling(engine: Any) -> ToolCalling | None:
    """How ``engine`` runs one request's tools, or None when it cannot: see the module docstring.

    A fresh object per request: ``parse`` reads the reply as the plan made by ``stream_options``
    (its style, and the call opening a forced ``tool_choice`` put in front of the reply).
    """
    tokenizer = getattr(engine, "tokenizer", None)
    if not callable(getattr(tokenizer, "template_source", None)):
        return None
    plans: list[ToolPlan] = []

    def stream_options(tools: list[dict[str, Any]], choice: Any) -> dict[str, Any]:
        checked, tool_choice = request_tools(tools, choice, engine)
        plan = plan_tools(tokenizer, [], checked, tool_choice, None)
        plans.append(plan)
        return engine_tool_options(checked, tool_choice, plan)

    def parse(text: str) -> tuple[str, Sequence[ToolCallLike]]:
        if not plans or not plans[-1].parse:
            return text, []
        return parse_tool_calls(text, plans[-1].style, plans[-1].prefix)

    return ToolCalling(parse=parse, stream_options=stream_options)


# ---------------------------------------------------------------- request -> OpenAI
def openai_tools(tools: list[dict[str, Any]], param: str = "tools") -> list[dict[str, Any]]:
    """Anthropic tool definitions -> OpenAI function tools.

    Raises:
        ApiRequestError: a tool has no name or a non-object ``input_schema``.
        UnsupportedParameterError: a server tool (``web_search_...``, ``bash_...``): its ``type``
            is named.
    """
    out = []
    for i, tool in enumerate(tools):
        where = f"{param}[{i}]"
        kind = tool.get("type", "custom")
        if kind != "custom":
            raise UnsupportedParameterError(
                f"{where}.type: tools of type {kind!r:.60} (server tools) are not supported; only custom tools "
                "with name, description and input_schema",
                param=f"{where}.type",
            )
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise ApiRequestError(f"{where}.name must be a non-empty string", param=f"{where}.name")
        schema = tool.get("input_schema")
        if not isinstance(schema, dict):
            raise ApiRequestError(
                f"{where}.input_schema must be a JSON Schema object, got {type(schema).__name__}",
                param=f"{where}.input_schema",
            )
        function: dict[str, Any] = {"name": name, "parameters": schema}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def openai_tool_choice(choice: dict[str, Any] | None, names: Sequence[str]) -> tuple[Any, bool]:
    """Anthropic ``tool_choice`` -> (OpenAI ``tool_choice``, ``parallel_tool_calls``).

    Raises:
        ApiRequestError: an unknown type, or ``tool`` naming no tool of the request.
    """
    if choice is None:
        return "auto", True
    kind = choice.get("type")
    parallel = not choice.get("disable_parallel_tool_use", False)
    if kind == "auto":
        return "auto", parallel
    if kind == "any":
        return "required", parallel
    if kind == "none":
        return "none", parallel
    if kind == "tool":
        name = choice.get("name")
        if name not in names:
            raise ApiRequestError(
                f"tool_choice.name {name!r:.60} names no tool of the request; tools: {', '.join(names)}",
                param="tool_choice.name",
            )
        return {"type": "function", "function": {"name": name}}, parallel
    raise ApiRequestError(
        f"tool_choice.type must be one of auto, any, tool, none, got {kind!r:.40}", param="tool_choice.type"
    )


def tool_use_message(text: str, blocks: list[dict[str, Any]], where: str) -> dict[str, Any]:
    """An assistant message's text and ``tool_use`` blocks -> an OpenAI message with ``tool_calls``.

    Raises:
        ApiRequestError: a block lacks its id or name, or its ``input`` is not an object.
    """
    calls = []
    for block in blocks:
        if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
            raise ApiRequestError(f"{where}: a tool_use block needs string id and name", param=where)
        arguments = block.get("input", {})
        if not isinstance(arguments, dict):
            raise ApiRequestError(
                f"{where}: tool_use input must be an object, got {type(arguments).__name__}", param=where
            )
        calls.append(
            {
                "id": block["id"],
                "type": "function",
                "function": {"name": block["name"], "arguments": json.dumps(arguments, ensure_ascii=False)},
            }
        )
    return {"role": "assistant", "content": text, "tool_calls": calls}


def join_parts(parts: list[dict[str, Any]], sep: str) -> str | list[dict[str, Any]]:
    """Text and image parts as a message's content: the texts joined with ``sep``, or, when there
    are images, the parts with each run of texts joined (the images keep their places)."""
    if not any(p["type"] == "image" for p in parts):
        return sep.join(p["text"] for p in parts)
    out: list[dict[str, Any]] = []
    for part in parts:
        if part["type"] == "text" and out and out[-1]["type"] == "text":
            out[-1] = {"type": "text", "text": out[-1]["text"] + sep + part["text"]}
        else:
            out.append(part)
    return out


def _result_content(content: Any, where: str) -> str | list[dict[str, Any]]:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiRequestError(f"{where} must be a string or a list of text and image blocks", param=where)
    parts = []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "image":
            parts.append(anthropic_image_block(block, f"{where}[{j}]"))
            continue
        if kind != "text" or not isinstance(block.get("text"), str):
            raise UnsupportedParameterError(
                f"{where}[{j}]: only text and image blocks are supported in a tool result, got type {kind!r:.40}",
                param=f"{where}[{j}].type",
            )
        parts.append({"type": "text", "text": block["text"]})
    return join_parts(parts, "\n\n")


def tool_result_messages(blocks: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """``tool_result`` blocks -> ``role: "tool"`` messages (an ``is_error`` result's text is
    prefixed with ``Error: `` so the model sees it failed). A result with images has a list of
    text and image parts as its content.

    Raises:
        ApiRequestError: a block lacks ``tool_use_id``, or its content is neither text nor images.
    """
    out = []
    for block in blocks:
        if not isinstance(block.get("tool_use_id"), str):
            raise ApiRequestError(f"{where}: a tool_result block needs a string tool_use_id", param=where)
        content = _result_content(block.get("content"), f"{where}.content")
        if block.get("is_error"):
            if isinstance(content, str):
                content = f"Error: {content}"
            elif content[0]["type"] == "text":
                content = [{"type": "text", "text": "Error: " + content[0]["text"]}, *content[1:]]
            else:
                content = [{"type": "text", "text": "Error: "}, *content]
        out.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": content})
    return out


# ---------------------------------------------------------------- calls -> reply
def _input_of(call: ToolCallLike) -> dict[str, Any] | None:
    try:
        value = json.loads(call.arguments)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def tool_use_block(call: ToolCallLike) -> dict[str, Any] | None:
    """A parsed call as a ``tool_use`` block; None when its arguments are not a JSON object."""
    arguments = _input_of(call)
    if arguments is None:
        return None
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": arguments}


def reply_content(text: str, calls: Sequence[ToolCallLike], stop_reason: str) -> tuple[list[dict[str, Any]], str]:
    """A reply's ``content`` blocks and ``stop_reason``: the text (if any, or if there are no
    calls), then one ``tool_use`` block per call; ``stop_reason`` becomes ``"tool_use"`` when
    there is a call. A call whose arguments are not a JSON object (Anthropic's ``input`` must
    be one) is logged and left out."""
    blocks = []
    for call in calls:
        block = tool_use_block(call)
        if block is None:
            logger.warning("tool call %r has arguments that are not a JSON object; left out", call.name)
        else:
            blocks.append(block)
    content = [{"type": "text", "text": text}] if text or not blocks else []
    return content + blocks, ("tool_use" if blocks else stop_reason)


def tool_use_events(index: int, block: dict[str, Any]) -> list[dict[str, Any]]:
    """The streamed events of one ``tool_use`` block at ``index``: its start (empty input),
    its arguments as one ``input_json_delta``, its stop."""
    start = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
    partial = json.dumps(block["input"], ensure_ascii=False)
    return [
        {"type": "content_block_start", "index": index, "content_block": start},
        {"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": partial}},
        {"type": "content_block_stop", "index": index},
    ]


__all__ = [
    "ToolCallLike",
    "ToolCalling",
    "join_parts",
    "openai_tool_choice",
    "openai_tools",
    "reply_content",
    "tool_calling",
    "tool_result_messages",
    "tool_use_block",
    "tool_use_events",
    "tool_use_message",
]

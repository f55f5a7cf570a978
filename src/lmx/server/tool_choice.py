"""Tool calls on the OpenAI and Ollama chat endpoints.

A request's ``tools`` are rendered through the model's chat template and the reply is read
back for calls (:mod:`lmx.generate.tools` says how, per template style). OpenAI replies carry
``message.tool_calls`` (``content`` is ``null`` when the reply is only calls) and
``finish_reason: "tool_calls"``; streams carry each call, whole, in one ``delta.tool_calls``
entry once its closing marker arrives (text that might open a call is held back until it is
clear it does not). Ollama replies carry ``message.tool_calls: [{"function": {"name",
"arguments": {...}}}]``.

``tool_choice``: ``"auto"`` (default); ``"none"``: the tools are not rendered (the model is not
told about them) and the reply is not parsed; ``"required"`` and ``{"type": "function",
"function": {"name": ...}}``: the reply is started with the opening of a call (a named function
is then the only tool rendered). See :func:`constraint_for` for what that does and does not
guarantee (constrained decoding against the tool's parameter schema). ``parallel_tool_calls`` is accepted; a reply may hold several calls either way.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from lmx.errors import InvalidOptionError
from lmx.generate.constraints import Constraint
from lmx.generate.tools import (
    ToolCallParser,
    ToolChoice,
    ToolPlan,
    forced_call_schema,
    parse_tool_choice,
    validate_tools,
)
from lmx.results import Token, ToolCall
from lmx.server.errors import ApiRequestError, UnsupportedParameterError


def constraint_for(tools: list[dict[str, Any]], tool_choice: ToolChoice, style: str) -> Constraint | None:
    """The decoding constraint that enforces ``tool_choice`` (the one hook for it).

    ``Constraint.json(forced_call_schema(tools, tool_choice.name))`` for ``"required"`` and a
    named function: the reply already starts inside a call (:attr:`ToolPlan.prefix`), so the
    constrained text is exactly the call's JSON, whatever the template ``style`` (both write
    ``{"name": ..., "arguments": {...}}`` between their markers); the parser takes a call whose
    closing marker never comes, once its JSON is complete. :func:`engine_tool_options` passes it
    to the engine as ``constraint=``. ``None`` for ``"auto"`` and ``"none"``.
    """
    del style
    if tool_choice.mode not in ("required", "function"):
        return None
    schema = forced_call_schema(tools, tool_choice.name)
    # The separators the templates show a call with ({"name": "f", "arguments": {...}}), not compact JSON.
    schema["x-guidance"] = {"item_separator": ", ", "key_separator": ": "}
    return Constraint.json(schema)


def engine_tool_options(tools: list[dict[str, Any]], tool_choice: ToolChoice, plan: ToolPlan | None) -> dict[str, Any]:
    """The keyword arguments of ``engine.stream_chat`` for a request's tools (none without
    tools): ``tools``, ``tool_choice``, and the ``constraint`` of :func:`constraint_for` if any."""
    if not tools or plan is None:
        return {}
    out: dict[str, Any] = {"tools": tools, "tool_choice": tool_choice}
    constraint = constraint_for(tools, tool_choice, plan.style)
    if constraint is not None:
        out["constraint"] = constraint
    return out


def request_tools(tools: Any, tool_choice: Any, engine: Any) -> tuple[list[dict[str, Any]], ToolChoice]:
    """Check a request's ``tools`` and ``tool_choice``.

    Raises:
        ApiRequestError: a bad tool (``param`` ``"tools"``) or tool choice (``"tool_choice"``),
            including a named function that is not in ``tools`` or ``tool_choice`` without tools.
        UnsupportedParameterError: tools on a server whose engine does not render templates here.
    """
    try:
        checked = validate_tools(tools)
    except InvalidOptionError as e:
        raise ApiRequestError(str(e), param="tools") from None
    try:
        choice = parse_tool_choice(tool_choice, checked)
    except InvalidOptionError as e:
        raise ApiRequestError(str(e), param="tool_choice") from None
    if tool_choice is not None and not checked and choice.mode != "none":
        raise ApiRequestError("tool_choice is only allowed when tools are given", param="tool_choice")
    if checked and not callable(getattr(getattr(engine, "tokenizer", None), "template_source", None)):
        raise UnsupportedParameterError("tools need an engine that renders chat templates here", param="tools")
    return checked, choice


def tool_message_fields(message: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The tool fields of a chat message that the template needs: an assistant's
    ``tool_calls``, a tool result's ``tool_call_id`` and ``name`` (Ollama: ``tool_name``).

    Raises:
        ApiRequestError: ``tool_calls`` is not a list of calls with a function name.
    """
    out: dict[str, Any] = {}
    calls = message.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            raise ApiRequestError(f"{where}.tool_calls must be a list, got {type(calls).__name__}", param=where)
        for j, call in enumerate(calls):
            fn = call.get("function") if isinstance(call, Mapping) else None
            if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
                raise ApiRequestError(
                    f"{where}.tool_calls[{j}] must be {{'function': {{'name', 'arguments'}}}}, got {call!r:.80}",
                    param=f"{where}.tool_calls",
                )
        if calls:
            out["tool_calls"] = calls
    for key in ("tool_call_id", "name", "tool_name"):
        if isinstance(message.get(key), str):
            out[key] = message[key]
    return out


def openai_tool_call(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    """A call as an OpenAI ``tool_calls`` entry (a streamed ``delta.tool_calls`` one with ``index``)."""
    entry = {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
    return entry if index is None else {"index": index, **entry}


def ollama_tool_call(call: ToolCall) -> dict[str, Any]:
    """A call as an Ollama ``message.tool_calls`` entry (arguments as an object)."""
    return {"function": {"name": call.name, "arguments": json.loads(call.arguments)}}


class ToolCallFormat:
    """Wraps the OpenAI chat formatter of one request, reading calls out of its reply."""

    def __init__(self, base: Any, plan: ToolPlan) -> None:
        self.base, self.plan = base, plan
        self.parser = ToolCallParser(plan.style, plan.prefix)
        self.sent = 0  # calls streamed so far (the next one's index)

    def chunk(self, token: Token) -> dict[str, Any] | None:
        """The streamed chunk of one token: its releasable text as ``delta.content`` and the
        calls it completed as ``delta.tool_calls``; the last one says ``"tool_calls"`` if any."""
        content, calls = self.parser.feed(token.text)
        finish = token.finish_reason
        if finish is not None:
            rest, more = self.parser.finish()
            content, calls = content + rest, calls + more
            if self.parser.calls:
                finish = "tool_calls"  # type: ignore[assignment]
        out = self.base.chunk(dataclasses.replace(token, text=content, finish_reason=finish))
        if not calls:
            return out
        if out is None:  # the formatter sends nothing for a token with no text: build the chunk
            delta = {} if self.base.sent_role else {"role": "assistant"}
            self.base.sent_role = True
            out = {
                "id": self.base.id,
                "object": "chat.completion.chunk",
                "created": self.base.created,
                "model": self.base.state.model_id,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}],
            }
        delta = out["choices"][0].setdefault("delta", {})
        if not delta.get("content"):
            delta["content"] = None
        delta["tool_calls"] = [openai_tool_call(c, self.sent + i) for i, c in enumerate(calls)]
        self.sent += len(calls)
        return out

    def usage_chunk(self, stream: Any) -> dict[str, Any]:
        """The closing usage chunk (unchanged by tools)."""
        return self.base.usage_chunk(stream)

    def usage(self, stream: Any) -> dict[str, Any]:
        """The reply's usage (unchanged by tools)."""
        return self.base.usage(stream)

    @property
    def id(self) -> str:
        """The reply's id (the wrapped formatter's: ``n > 1`` choices share one)."""
        return self.base.id

    @id.setter
    def id(self, value: str) -> None:
        self.base.id = value

    @property
    def created(self) -> int:
        """The reply's timestamp (the wrapped formatter's)."""
        return self.base.created

    @created.setter
    def created(self, value: int) -> None:
        self.base.created = value

    def completion(self, tokens: list[Token], stream: Any) -> dict[str, Any]:
        """The whole reply, with ``message.tool_calls`` and ``finish_reason: "tool_calls"`` when
        it holds calls (``content`` is then ``null`` unless there was other text)."""
        out = self.base.completion(tokens, stream)
        choice = out["choices"][0]
        parser = ToolCallParser(self.plan.style, self.plan.prefix)
        content, calls = parser.feed("".join(t.text for t in tokens))
        rest, more = parser.finish()
        content, calls = content + rest, calls + more
        if calls:
            choice["message"]["content"] = content if content.strip() else None
            choice["message"]["tool_calls"] = [openai_tool_call(c) for c in calls]
            choice["finish_reason"] = "tool_calls"
        else:
            choice["message"]["content"] = content
        return out


class OllamaToolPiece:
    """The ``message`` of Ollama chat replies with tools: called with each piece of text as it
    streams and with ``""`` at the end (or once with the whole text when ``whole``)."""

    def __init__(self, plan: ToolPlan, *, whole: bool) -> None:
        self.parser = ToolCallParser(plan.style, plan.prefix)
        self.whole = whole

    def __call__(self, text: str) -> dict[str, Any]:
        content, calls = self.parser.feed(text)
        if self.whole or not text:
            rest, more = self.parser.finish()
            content, calls = content + rest, calls + more
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = [ollama_tool_call(c) for c in calls]
        return {"message": message}

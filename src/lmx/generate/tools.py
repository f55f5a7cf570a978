"""Tool (function) calls: checking OpenAI tool lists, rendering them, parsing the model's calls.

Two styles, picked from the chat template that renders the conversation:

* ``"qwen"``: the template renders ``tools`` itself and asks for ``<tool_call>{"name": ...,
  "arguments": {...}}</tool_call>`` blocks (Qwen 3, Hermes-style templates: any template whose
  text contains ``<tool_call>``). Tools, assistant ``tool_calls`` and ``role: "tool"`` results
  are passed to the template unchanged; it renders results as ``<tool_response>`` blocks.
* ``"gemma"``: every other template (Gemma 3's has no tool support). lmx renders the tools
  into the system turn (see :data:`GEMMA_TOOL_PROMPT`) and asks for one fenced block per call::

      ```tool_call
      {"name": "get_weather", "arguments": {"city": "Paris"}}
      ```

  An assistant turn's ``tool_calls`` are written back the same way, and ``role: "tool"``
  results become a user turn of ```` ```tool_output ```` blocks (Gemma's own name for them),
  merged with a user message that follows, since Gemma's template needs alternating turns.

A call whose JSON does not parse (or is not ``{"name": str, "arguments": object}``) stays in
the text: it is never an error.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from lmx.errors import InvalidOptionError
from lmx.results import ToolCall  # defined with the other results; exported here too

__all__ = [
    "ToolCall",
    "ToolCallParser",
    "ToolChoice",
    "ToolPlan",
    "forced_call_schema",
    "parse_tool_calls",
    "parse_tool_choice",
    "plan_tools",
    "tool_style",
    "validate_tools",
]

Style = Literal["qwen", "gemma"]
STYLES: tuple[str, ...] = ("qwen", "gemma")
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
TOOL_CHOICE_MODES = ("auto", "none", "required")

# Opening and closing markers of one call, by style.
MARKERS: dict[str, tuple[str, str]] = {
    "qwen": ("<tool_call>", "</tool_call>"),
    "gemma": ("```tool_call", "```"),
}

GEMMA_TOOL_PROMPT = (
    "You have access to the following functions:\n{functions}\n\n"
    "To call a function, reply with one block per call, in this format and with no other text:\n"
    '```tool_call\n{{"name": <function name>, "arguments": <JSON object of the arguments>}}\n```\n'
    "Function results come back to you in ```tool_output``` blocks."
)
"""The system-turn text that describes the tools to a model whose template has no tool support
(``{functions}`` is the JSON list of the tools' ``function`` objects, one per line)."""


def new_call_id() -> str:
    """A fresh tool-call id: ``call_`` and 24 random hex digits."""
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True)
class ToolChoice:
    """What the model may or must do with the tools.

    Attributes:
        mode: ``"auto"`` (call or answer), ``"none"`` (answer only), ``"required"`` (call one
            or more), or ``"function"`` (call ``name``).
        name: the function a ``"function"`` choice names.
    """

    mode: Literal["auto", "none", "required", "function"]
    name: str | None = None


# ---------------------------------------------------------------- checking
def validate_tools(tools: Any) -> list[dict[str, Any]]:
    """Check a list of OpenAI function tools.

    Each tool must be ``{"type": "function", "function": {"name", "description"?,
    "parameters"?, "strict"?}}`` with a name of 1-64 letters, digits, ``_`` or ``-`` (unique in
    the list) and ``parameters``, when given, a JSON Schema of an object.

    Args:
        tools: the tools, or ``None``.

    Returns:
        The tools as plain dicts (an empty list for ``None``).

    Raises:
        InvalidOptionError: a tool is malformed; the message names it (``tools[1].function.name``)
            and what is allowed.
    """
    if tools is None:
        return []
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise InvalidOptionError(f"tools must be a list of function tools, got {type(tools).__name__}")
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping):
            raise InvalidOptionError(f"{where} must be an object, got {type(tool).__name__}")
        if tool.get("type") != "function":
            raise InvalidOptionError(f"{where}.type must be 'function', got {tool.get('type')!r:.40}")
        fn = tool.get("function")
        if not isinstance(fn, Mapping):
            raise InvalidOptionError(f"{where}.function must be an object with a 'name', got {type(fn).__name__}")
        name = fn.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise InvalidOptionError(
                f"{where}.function.name must be 1-64 letters, digits, '_' or '-', got {name!r:.80}"
            )
        if name in seen:
            raise InvalidOptionError(f"{where}.function.name {name!r} is given twice; tool names must be unique")
        seen.add(name)
        description = fn.get("description")
        if description is not None and not isinstance(description, str):
            raise InvalidOptionError(f"{where}.function.description must be a string, got {type(description).__name__}")
        params = fn.get("parameters")
        if params is not None:
            if not isinstance(params, Mapping):
                raise InvalidOptionError(
                    f"{where}.function.parameters must be a JSON Schema object, got {type(params).__name__}"
                )
            if params.get("type", "object") != "object":
                raise InvalidOptionError(
                    f"{where}.function.parameters must describe an object (type 'object'), "
                    f"got type {params.get('type')!r:.40}"
                )
        out.append(json.loads(json.dumps(tool)))
    return out


def tool_names(tools: Sequence[Mapping[str, Any]]) -> list[str]:
    """The function names of checked tools, in order."""
    return [t["function"]["name"] for t in tools]


def parse_tool_choice(tool_choice: Any, tools: Sequence[Mapping[str, Any]]) -> ToolChoice:
    """Read an OpenAI ``tool_choice``: ``"auto"``, ``"none"``, ``"required"``, or
    ``{"type": "function", "function": {"name": ...}}`` (``None`` means ``"auto"``).

    Args:
        tool_choice: the request's value.
        tools: the checked tools (:func:`validate_tools`).

    Raises:
        InvalidOptionError: an unknown mode, a malformed object, a name that is not one of
            ``tools``, or ``"required"``/a name without tools.
    """
    if tool_choice is None:
        return ToolChoice("auto")
    names = tool_names(tools)
    if isinstance(tool_choice, str):
        if tool_choice not in TOOL_CHOICE_MODES:
            raise InvalidOptionError(
                f"tool_choice must be one of {', '.join(TOOL_CHOICE_MODES)} or "
                f'{{"type": "function", "function": {{"name": ...}}}}, got {tool_choice!r:.40}'
            )
        if tool_choice == "required" and not tools:
            raise InvalidOptionError("tool_choice 'required' needs tools, and none were given")
        return ToolChoice(tool_choice)  # type: ignore[arg-type]
    fn = tool_choice.get("function") if isinstance(tool_choice, Mapping) else None
    name = fn.get("name") if isinstance(fn, Mapping) else None
    if not isinstance(tool_choice, Mapping) or tool_choice.get("type") != "function" or not isinstance(name, str):
        raise InvalidOptionError(
            f"tool_choice must be one of {', '.join(TOOL_CHOICE_MODES)} or "
            f'{{"type": "function", "function": {{"name": ...}}}}, got {tool_choice!r:.80}'
        )
    if name not in names:
        allowed = ", ".join(names) if names else "none were given"
        raise InvalidOptionError(f"tool_choice names function {name!r:.80}, which is not in tools ({allowed})")
    return ToolChoice("function", name)


# ---------------------------------------------------------------- rendering
def tool_style(template_source: str | None) -> Style:
    """The tool-call style of a chat template: ``"qwen"`` when its text has ``<tool_call>``
    (it renders tools itself), else ``"gemma"`` (lmx's convention, see the module docstring)."""
    return "qwen" if template_source and "<tool_call>" in template_source else "gemma"


@dataclass(frozen=True)
class ToolPlan:
    """How one chat request with tools is rendered and read back.

    Attributes:
        style: ``"qwen"`` or ``"gemma"``.
        messages: the messages to render (for ``"gemma"``, tool turns rewritten as text).
        template_tools: the ``tools`` the template gets (``None``: the template sees none).
        prefix: text appended after the generation prompt, the start of the reply: the opening
            of a call when one is required, so the model continues inside it. The reply's text
            does not repeat it; read it with :class:`ToolCallParser` ``(style, prefix)``.
        parse: whether the reply is read for calls (not with ``tool_choice: "none"``).
    """

    style: Style
    messages: list[dict[str, Any]]
    template_tools: list[dict[str, Any]] | None
    prefix: str
    parse: bool


def plan_tools(tokenizer: Any, messages: Any, tools: Any, tool_choice: Any, chat_template: str | None) -> ToolPlan:
    """Check ``tools`` and ``tool_choice`` and decide how the chat is rendered and parsed.

    ``tool_choice: "none"`` renders no tools (the model is not told about them) and does not
    parse the reply; ``"required"`` and a named function start the reply with the opening of a
    call (a named function is then the only tool rendered). Without tools, messages are
    returned unchanged unless they hold tool calls or results that the style must rewrite.

    Args:
        tokenizer: has ``template_source(chat_template, tools)`` (:class:`lmx.tokenizer.Tokenizer`).
        messages: the conversation.
        tools: OpenAI function tools, or ``None``.
        tool_choice: as :func:`parse_tool_choice` takes it (a :class:`ToolChoice` too).
        chat_template: the template asked for (``chat_template_kwargs["chat_template"]``) or ``None``.

    Raises:
        InvalidOptionError: bad ``tools`` or ``tool_choice``.
    """
    checked = validate_tools(tools)
    choice = tool_choice if isinstance(tool_choice, ToolChoice) else parse_tool_choice(tool_choice, checked)
    style = tool_style(tokenizer.template_source(chat_template, checked or None))
    shown: list[dict[str, Any]] | None = checked or None
    if choice.mode == "none":
        shown = None
    elif choice.mode == "function":
        shown = [t for t in checked if t["function"]["name"] == choice.name]
    prefix = MARKERS[style][0] + "\n" if choice.mode in ("required", "function") else ""
    if style == "gemma":
        return ToolPlan(style, gemma_messages(messages, shown), None, prefix, choice.mode != "none")
    return ToolPlan(style, messages, shown, prefix, choice.mode != "none")


def _call_parts(call: Any) -> tuple[str, str]:
    fn = call.get("function", call) if isinstance(call, Mapping) else {}
    name = fn.get("name") if isinstance(fn, Mapping) else None
    args = fn.get("arguments", {}) if isinstance(fn, Mapping) else {}
    if not isinstance(name, str):
        raise InvalidOptionError(f"a tool call in the messages has no function name: {call!r:.80}")
    return name, args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


def gemma_call_block(name: str, arguments: str) -> str:
    """One call in the ``"gemma"`` style (``arguments`` is JSON text)."""
    return f'```tool_call\n{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": {arguments}}}\n```'


def gemma_messages(messages: Any, tools: list[dict[str, Any]] | None) -> Any:
    """The conversation rewritten for a template without tool support (the ``"gemma"`` style).

    The tools go into the system turn (after its own text), an assistant's ``tool_calls``
    into its text as ```` ```tool_call ```` blocks, and ``role: "tool"`` results into a user
    turn of ```` ```tool_output ```` blocks. Messages without any of these come back as given.

    Raises:
        InvalidOptionError: an assistant tool call has no function name.
    """
    if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
        return messages  # the renderer refuses it, naming what is wrong
    has_tool_turns = any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)
    if not tools and not has_tool_turns:
        return messages
    out: list[dict[str, Any]] = []
    names_by_id: dict[str, str] = {}
    pending: list[str] = []  # tool_output blocks waiting for their user turn
    pending_images: list[Any] = []  # image parts of those results: they follow the blocks
    for message in messages:
        role = message.get("role")
        if role == "tool":
            name = message.get("name") or message.get("tool_name") or names_by_id.get(message.get("tool_call_id", ""))
            head = f"Result of {name}:\n" if isinstance(name, str) and name else ""
            pending.append(f"{head}```tool_output\n{_text(message.get('content'))}\n```")
            pending_images += _images(message.get("content"))
            continue
        if pending:
            joined = "\n\n".join(pending)
            pending = []
            if role == "user":
                message = {**message, "content": _after_results(joined, pending_images, message.get("content"))}
            else:
                out.append({"role": "user", "content": _after_results(joined, pending_images, None)})
            pending_images = []
        if role == "assistant" and message.get("tool_calls"):
            blocks = []
            for call in message["tool_calls"]:
                name, args = _call_parts(call)
                if isinstance(call, Mapping) and isinstance(call.get("id"), str):
                    names_by_id[call["id"]] = name
                blocks.append(gemma_call_block(name, args))
            text = _text(message.get("content"))
            message = {k: v for k, v in message.items() if k != "tool_calls"}
            message["content"] = "\n".join(([text] if text else []) + blocks)
        out.append(message)
    if pending:
        out.append({"role": "user", "content": _after_results("\n\n".join(pending), pending_images, None)})
    if tools:
        functions = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
        text = GEMMA_TOOL_PROMPT.format(functions=functions)
        if out and out[0].get("role") == "system":
            own = _text(out[0].get("content"))
            out[0] = {**out[0], "content": (own + "\n\n" if own else "") + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def _images(content: Any) -> list[Any]:
    """The image parts of a message's content."""
    if not isinstance(content, list):
        return []
    return [p for p in content if isinstance(p, Mapping) and p.get("type") == "image"]


def _after_results(results: str, images: list[Any], content: Any) -> Any:
    """A user turn's content: the tool results' text, their images, then the user's own content
    (None: the turn is the results alone). Text when no part is an image; else parts, so no
    image is lost."""
    if not images and not _images(content):
        return results if content is None else results + "\n\n" + _text(content)
    own = [] if content is None else content if isinstance(content, list) else [{"type": "text", "text": str(content)}]
    return [{"type": "text", "text": results + "\n\n"}, *images, *own]


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, Mapping))
    return str(content)


# ---------------------------------------------------------------- parsing
def _read_call(body: str) -> ToolCall | None:
    """The call in the JSON text between a call's markers, or ``None`` if it is not one."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
        return None
    args = data.get("arguments", data.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(new_call_id(), data["name"], json.dumps(args, ensure_ascii=False))


class ToolCallParser:
    """Reads a reply as it streams: text goes out as soon as it cannot be the start of a call;
    from a call's opening marker on, text is held until the call closes, and then comes out
    as a :class:`ToolCall` (or, if its JSON is not a call, as the text it was).

    Whitespace between and after calls is dropped (it is layout, not content). Feeding a text
    in any pieces gives the same content and calls as feeding it whole.
    """

    def __init__(self, style: str, prefix: str = "") -> None:
        """Args:
        style: ``"qwen"`` or ``"gemma"``.
        prefix: text the reply starts with that the model did not generate (:attr:`ToolPlan.prefix`).

        Raises:
            InvalidOptionError: an unknown style.
        """
        if style not in MARKERS:
            raise InvalidOptionError(f"tool-call style must be one of {', '.join(STYLES)}, got {style!r:.40}")
        self.open, self.close = MARKERS[style]
        self.buffer = prefix
        self.inside = False
        self.calls: list[ToolCall] = []
        self.gap = ""  # whitespace after a call, sent only if more text follows

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """Add generated text; return the content that can go out now and the calls completed."""
        self.buffer += text
        out: list[str] = []
        calls: list[ToolCall] = []
        while True:
            if self.inside:
                end = self.buffer.find(self.close, len(self.open))
                if end < 0:
                    break
                block = self.buffer[: end + len(self.close)]
                self.buffer = self.buffer[end + len(self.close) :]
                self.inside = False
                self._finish_block(block, block[len(self.open) : end], out, calls)
                continue
            start = self.buffer.find(self.open)
            if start >= 0:
                self._emit(self.buffer[:start], out)
                self.buffer = self.buffer[start:]
                self.inside = True
                continue
            keep = _partial_suffix(self.buffer, self.open)
            self._emit(self.buffer[: len(self.buffer) - keep], out)
            self.buffer = self.buffer[len(self.buffer) - keep :]
            break
        return "".join(out), calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The end of the reply: what is still held comes out (an unclosed call whose JSON is
        complete counts as a call)."""
        out: list[str] = []
        calls: list[ToolCall] = []
        if self.inside:
            self._finish_block(self.buffer, self.buffer[len(self.open) :], out, calls)
        else:
            self._emit(self.buffer, out)
        self.buffer, self.inside = "", False
        return "".join(out), calls

    def _finish_block(self, block: str, body: str, out: list[str], calls: list[ToolCall]) -> None:
        call = _read_call(body.strip())
        if call is None:
            self._emit(block, out)
        else:
            self.gap = ""
            calls.append(call)
            self.calls.append(call)

    def _emit(self, text: str, out: list[str]) -> None:
        if not text:
            return
        if self.calls and not (self.gap + text).strip():
            self.gap += text
            return
        out.append(self.gap + text)
        self.gap = ""


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of ``text`` that is a proper start of ``marker``."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def parse_tool_calls(text: str, style: str, prefix: str = "") -> tuple[str, list[ToolCall]]:
    """Split a whole reply into its text content and its tool calls.

    Args:
        text: the generated text.
        style: ``"qwen"`` (``<tool_call>{json}</tool_call>``) or ``"gemma"``
            (```` ```tool_call\\n{json}\\n``` ````).
        prefix: text the reply started with that the model did not generate.

    Returns:
        ``(content, calls)``: the text with each well-formed call taken out (whitespace between
        and after calls dropped), and the calls in order. A call whose JSON is malformed stays
        in the content.

    Raises:
        InvalidOptionError: an unknown style.
    """
    parser = ToolCallParser(style, prefix)
    content, calls = parser.feed(text)
    rest, more = parser.finish()
    return content + rest, calls + more


# ---------------------------------------------------------------- forcing a call
def _call_schema(tool: Mapping[str, Any]) -> dict[str, Any]:
    fn = tool["function"]
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    return {
        "type": "object",
        "properties": {"name": {"const": fn["name"]}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def forced_call_schema(tools: list[dict], name: str | None) -> dict:
    """The JSON Schema a forced call's JSON (the text between the call's markers) must match.

    Args:
        tools: OpenAI function tools.
        name: the function that must be called, or ``None`` for any of ``tools``
            (``tool_choice: "required"``).

    Returns:
        ``{"type": "object", "properties": {"name": {"const": name}, "arguments": <the tool's
        parameters>}, "required": [...], "additionalProperties": false}``; for ``name=None`` and
        several tools, ``{"anyOf": [...]}`` of one such object per tool, so the arguments
        must match the schema of the function named.

    Raises:
        InvalidOptionError: bad tools, no tools, or ``name`` not among them.
    """
    checked = validate_tools(tools)
    if not checked:
        raise InvalidOptionError("a forced tool call needs tools, and none were given")
    if name is not None:
        chosen = [t for t in checked if t["function"]["name"] == name]
        if not chosen:
            raise InvalidOptionError(f"function {name!r:.80} is not in tools ({', '.join(tool_names(checked))})")
        return _call_schema(chosen[0])
    if len(checked) == 1:
        return _call_schema(checked[0])
    return {"anyOf": [_call_schema(t) for t in checked]}

"""Request bodies of the Anthropic Messages API (``POST /v1/messages``,
``POST /v1/messages/count_tokens``) and their translation to engine messages and options.

Anthropic messages are ``{"role": "user" | "assistant", "content": str | [blocks]}`` with the
system prompt in a top-level ``system`` field. Text blocks are turned into the engine's
``{"role", "content"}`` messages (several text blocks of one message are joined with a blank
line, as are consecutive messages of the same role, which Anthropic's API merges too).
``image`` blocks (base64 sources: :func:`lmx.server.images.anthropic_image_block`) in user
messages and tool results keep their place among the text: such a message's content is a list
of the engine's text and image parts. ``tool_use`` and ``tool_result`` blocks become
OpenAI-shaped ``tool_calls`` and ``role: "tool"`` messages (:mod:`lmx.server.anthropic_tools`).
Any other block type (``document``...) is refused with a 400 naming it. Like the OpenAI
endpoints, unknown request fields are refused; bookkeeping fields (``metadata``,
``service_tier``) are accepted and ignored. ``pan_and_scan`` (an lmx extension) turns Gemma 3's
crops of long images on or off for the request (absent: the checkpoint's processor config).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from lmx.server.anthropic_tools import join_parts, tool_result_messages, tool_use_message
from lmx.server.errors import ApiRequestError, UnsupportedParameterError
from lmx.server.images import anthropic_image_block

ANTHROPIC_ROLES = ("user", "assistant")
JOIN = "\n\n"  # between text blocks of one message, and between merged messages of one role


class _AnthropicBase(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    pan_and_scan: bool | None = None  # lmx extension: crops of long images (None: the checkpoint's config)


class MessagesRequest(_AnthropicBase):
    """``POST /v1/messages``."""

    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    # Bookkeeping fields: accepted and ignored, they do not change the reply.
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None


class CountTokensRequest(_AnthropicBase):
    """``POST /v1/messages/count_tokens``."""


# ---------------------------------------------------------------- messages
def _text_of_blocks(blocks: list[Any], where: str) -> str:
    """The text of a list of ``text`` blocks (a system prompt, a tool result's content)."""
    texts = []
    for j, block in enumerate(blocks):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind != "text":
            raise UnsupportedParameterError(
                f"{where}[{j}]: only text blocks are supported here, got type {kind!r:.40}", param=f"{where}[{j}].type"
            )
        if not isinstance(block.get("text"), str):
            raise ApiRequestError(f"{where}[{j}].text must be a string", param=f"{where}[{j}].text")
        texts.append(block["text"])
    return JOIN.join(texts)


def system_text(system: str | list[dict[str, Any]] | None) -> str:
    """The system prompt as one string ("" when there is none).

    Raises:
        UnsupportedParameterError: a system block is not a text block.
    """
    if system is None or isinstance(system, str):
        return system or ""
    return _text_of_blocks(system, "system")


def _message(message: Any, i: int) -> list[dict[str, Any]]:
    """One Anthropic message -> engine messages (a user message holding ``tool_result``
    blocks becomes ``role: "tool"`` messages, then the user's text if any)."""
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise ApiRequestError(f"{where} must be an object with role and content", param=where)
    unknown = set(message) - {"role", "content"}
    if unknown:
        name = sorted(unknown)[0]
        raise ApiRequestError(f"{where}: unrecognized field {name!r:.40}", param=f"{where}.{name}")
    role = message.get("role")
    if role not in ANTHROPIC_ROLES:
        hint = " (put the system prompt in the top-level 'system' field)" if role == "system" else ""
        raise ApiRequestError(
            f"{where}.role must be one of {', '.join(ANTHROPIC_ROLES)}, got {role!r:.40}{hint}", param=f"{where}.role"
        )
    content = message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise ApiRequestError(
            f"{where}.content must be a string or a list of content blocks, got {type(content).__name__}",
            param=f"{where}.content",
        )
    parts: list[dict[str, Any]] = []  # text and image parts, in order
    tool_uses: list[dict[str, Any]] = []
    tool_results: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            if not isinstance(block.get("text"), str):
                raise ApiRequestError(f"{at}.text must be a string", param=f"{at}.text")
            parts.append({"type": "text", "text": block["text"]})
        elif kind == "image" and role == "user":
            parts.append(anthropic_image_block(block, at))
        elif kind == "image":
            raise ApiRequestError(f"{at}: image blocks can only be in user messages", param=f"{at}.type")
        elif kind == "tool_use" and role == "assistant":
            tool_uses.append(block)
        elif kind == "tool_result" and role == "user":
            tool_results.append(block)
        elif kind in ("tool_use", "tool_result"):
            raise ApiRequestError(f"{at}: a {kind} block cannot be in a {role} message", param=f"{at}.type")
        else:
            raise UnsupportedParameterError(
                f"{at}: content blocks of type {kind!r:.40} are not supported; supported: text, image (user), "
                "tool_use (assistant), tool_result (user)",
                param=f"{at}.type",
            )
    if tool_uses:
        return [tool_use_message(JOIN.join(p["text"] for p in parts), tool_uses, f"{where}.content")]
    out = tool_result_messages(tool_results, f"{where}.content") if tool_results else []
    if parts or not tool_results:
        out.append({"role": role, "content": join_parts(parts, JOIN)})
    return out


def engine_messages(req: MessagesRequest | CountTokensRequest) -> list[dict[str, Any]]:
    """The request's conversation as engine messages: the system prompt first (if any), then
    the messages, consecutive plain-text messages of one role merged.

    Raises:
        ApiRequestError: a message is malformed (bad role, content not a string or blocks).
        UnsupportedParameterError: a content block of a type other than text/tool_use/tool_result.
    """
    out: list[dict[str, Any]] = []
    system = system_text(req.system)
    if system:
        out.append({"role": "system", "content": system})
    for i, message in enumerate(req.messages):
        for m in _message(message, i):
            prev = out[-1] if out else None
            plain = set(m) == {"role", "content"}
            if prev is not None and plain and set(prev) == {"role", "content"} and prev["role"] == m["role"]:
                prev["content"] = _merge(prev["content"], m["content"])
            else:
                out.append(dict(m))
    return out


def _merge(first: str | list[dict[str, Any]], second: str | list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """The content of two consecutive messages of one role, as one message's: texts that meet
    are joined with a blank line; an image needs none (its block is set off by blank lines)."""
    if isinstance(first, str) and isinstance(second, str):
        return first + JOIN + second if first else second
    as_parts = [[{"type": "text", "text": c}] if isinstance(c, str) else c for c in (first, second) if c]
    return join_parts([p for parts in as_parts for p in parts], JOIN)


def uses_tools(messages: list[dict[str, Any]]) -> bool:
    """Whether engine messages carry tool calls or tool results."""
    return any(m.get("tool_calls") or m["role"] == "tool" for m in messages)


def check_thinking(thinking: dict[str, Any] | None) -> None:
    """Refuse extended thinking (only ``{"type": "disabled"}`` is accepted).

    Raises:
        UnsupportedParameterError: thinking is enabled.
    """
    if thinking is not None and thinking.get("type") != "disabled":
        raise UnsupportedParameterError(
            f"extended thinking is not supported (thinking.type must be 'disabled', got {thinking.get('type')!r:.40})",
            param="thinking.type",
        )


# ---------------------------------------------------------------- options
# Engine option name -> the Anthropic request field it comes from.
ANTHROPIC_PARAMS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "max_tokens": "max_tokens",
    "stop": "stop_sequences",
}


def anthropic_options(req: MessagesRequest) -> dict[str, Any]:
    """Engine options of a Messages request (``max_tokens`` is required, as Anthropic requires it).

    Raises:
        ApiRequestError: ``max_tokens`` is below 1.
    """
    if req.max_tokens < 1:
        raise ApiRequestError(f"max_tokens must be at least 1, got {req.max_tokens}", param="max_tokens")
    opts: dict[str, Any] = {"max_tokens": req.max_tokens}
    for name in ("temperature", "top_p", "top_k"):
        value = getattr(req, name)
        if value is not None:
            opts[name] = value
    if req.stop_sequences:
        opts["stop"] = list(req.stop_sequences)
    return opts


__all__ = [
    "ANTHROPIC_PARAMS",
    "CountTokensRequest",
    "MessagesRequest",
    "anthropic_options",
    "check_thinking",
    "engine_messages",
    "system_text",
    "uses_tools",
]

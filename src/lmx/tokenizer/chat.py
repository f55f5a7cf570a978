"""Chat templates: Jinja rendering that matches Hugging Face ``transformers``.

The environment mirrors ``transformers.utils.chat_template_utils``: a sandboxed, immutable
Jinja environment with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols``
extension, a ``{% generation %}`` block (rendered as plain text here), a ``tojson`` filter
that does not HTML-escape, and the ``raise_exception``, ``strftime_now``, ``dict`` and
``namespace`` globals. Messages are normalised the same way (keys holding ``None`` dropped,
reasoning fields aliased, everything rebuilt from plain JSON types), so a template renders
the same string here as with ``tokenizer.apply_chat_template(..., tokenize=False)``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils

from lmx.errors import ChatTemplateError, TokenizerError
from lmx.tokenizer.sandbox import LimitedEnvironment, TemplateLimits

# Names a message's reasoning may be given under; templates (Qwen 3) read the first.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# Variables the renderer sets itself; template kwargs may not replace them.
_RESERVED_VARIABLES = frozenset({"messages", "tools", "add_generation_prompt"})


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: marks assistant text; rendered unchanged."""

    tags = {"generation"}  # noqa: RUF012 (jinja2 reads this class attribute)

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore names, so templates cannot reach Python internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # same signature trick as jinja2's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes, got {name!r}")


class _TemplateDict:
    """``dict()`` for templates, without exposing the ``dict`` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; chat prompts need the raw JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def compile_chat_template(source: str, *, name: str = "") -> jinja2.Template:
    """Compile a chat template in a fresh sandboxed environment configured like ``transformers``.

    Args:
        source: The Jinja source of the template.
        name: The model name, used in error messages.

    Returns:
        The compiled template.

    Raises:
        TokenizerError: the template is not a string or has a syntax error.
    """
    if not isinstance(source, str):
        raise TokenizerError(f"chat template of {name or 'the tokenizer'} must be a str, got {type(source).__name__}")
    env = LimitedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.limit_filters()
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(
            f"chat template of {name or 'the tokenizer'} has a syntax error on line {e.lineno}: {e.message}"
        ) from e
    except RecursionError as e:  # a source nested thousands of blocks deep
        raise TokenizerError(f"chat template of {name or 'the tokenizer'} is nested too deeply to compile") from e


def _plain(value: Any) -> Any:
    """Rebuild ``value`` from plain JSON types, so templates never see methods of rich objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        # numpy scalars: np.bool_(False) must stay falsy, not become a placeholder string.
        return _plain(value.item())
    return f"<{type(value).__name__}>"


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Check chat messages and convert them the way ``transformers`` does before rendering.

    Each message must be a mapping with a string ``role`` and a ``content`` that is a string
    or a list of content parts; ``content`` may be missing or ``None`` only on a message that
    has ``tool_calls``. Keys holding ``None`` are dropped, and ``reasoning_content``,
    ``thinking`` and ``reasoning`` are filled from whichever of them is given.

    Args:
        messages: The conversation, a non-empty list of message dicts.

    Returns:
        New message dicts made of plain JSON types; the caller's messages are not changed.

    Raises:
        TokenizerError: ``messages`` is not a non-empty list of valid message dicts.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TokenizerError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    if not messages:
        raise TokenizerError("messages is empty: a chat needs at least one message")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TokenizerError(
                f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}: {message!r:.80}"
            )
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise TokenizerError(f"messages[{i}]['role'] must be a non-empty str, got {role!r:.80}")
        content = message.get("content")
        if content is None:
            if not message.get("tool_calls"):
                raise TokenizerError(f"messages[{i}] ({role}) has no 'content' (allowed only with 'tool_calls')")
        elif not isinstance(content, (str, list, tuple)):
            raise TokenizerError(
                f"messages[{i}]['content'] must be a str or a list of content parts, got {type(content).__name__}"
            )
        plain = _plain({k: v for k, v in message.items() if v is not None})
        reasoning = next((plain[k] for k in _REASONING_FIELDS if plain.get(k) is not None), None)
        if reasoning is not None:
            plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
        out.append(plain)
    return out


def render_chat_template(
    template: jinja2.Template,
    messages: Any,
    *,
    add_generation_prompt: bool,
    tools: list[Any] | None = None,
    variables: Mapping[str, Any] | None = None,
    name: str = "",
    limits: TemplateLimits | None = None,
) -> str:
    """Render a compiled chat template for one conversation, under ``limits``.

    Args:
        template: A template from :func:`compile_chat_template`.
        messages: The conversation (see :func:`normalize_messages`).
        add_generation_prompt: Whether to end with the header that opens the assistant's turn.
        tools: JSON schemas of the tools the model may call, or ``None``.
        variables: Further template variables: the special tokens (``bos_token``, ...) and any
            extra keyword such as ``enable_thinking``.
        name: The model name, used in error messages.
        limits: Time, size and depth limits of the render (default: :class:`TemplateLimits`()).

    Returns:
        The rendered prompt text.

    Raises:
        TokenizerError: bad messages or tools, or a reserved variable in ``variables``.
        ChatTemplateError: the template failed (any exception it raised, its own
            ``raise_exception`` included) or reached one of ``limits``.
    """
    label = name or "the tokenizer"
    try:
        return _render(template, messages, add_generation_prompt, tools, variables, label, limits or TemplateLimits())
    except RecursionError as e:  # messages or variables nested thousands deep
        raise TokenizerError(f"chat messages or template variables for {label} are nested too deeply") from e


def _render(
    template: jinja2.Template,
    messages: Any,
    add_generation_prompt: bool,
    tools: list[Any] | None,
    variables: Mapping[str, Any] | None,
    label: str,
    limits: TemplateLimits,
) -> str:
    chat = normalize_messages(messages)
    if tools is not None:
        if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
            raise TokenizerError(f"tools must be a list of JSON-schema dicts, got {type(tools).__name__}")
        for i, tool in enumerate(tools):
            if not isinstance(tool, Mapping):
                raise TokenizerError(f"tools[{i}] must be a JSON-schema dict, got {type(tool).__name__}")
        tools = _plain(list(tools))
    extra = dict(variables or {})
    clash = sorted(_RESERVED_VARIABLES & extra.keys())
    if clash:
        raise TokenizerError(f"template variables {clash} are set by apply_chat_template and cannot be passed")
    context = {"documents": None, **_plain(extra), "messages": chat, "tools": tools}
    context["add_generation_prompt"] = add_generation_prompt
    env = template.environment
    if not isinstance(env, LimitedEnvironment):
        raise TokenizerError(f"chat template of {label} was not compiled by compile_chat_template")
    try:
        return env.render_limited(template, context, limits, label)
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template of {label} failed: {e}") from e
    except Exception as e:  # template code is arbitrary: whatever it raises is the template's failure
        raise ChatTemplateError(f"chat template of {label} failed: {type(e).__name__}: {_short(e)}") from e


def _short(e: BaseException) -> str:
    try:
        return f"{e!s:.300}"
    except ValueError:  # str() of an int past Python's digit limit, inside the message
        return "(message not printable)"


def load_chat_templates(root: Path, tokenizer_config: Mapping[str, Any]) -> dict[str, str]:
    """The chat templates of a Hugging Face model directory, by name (``"default"``, ``"tool_use"``...).

    Sources, later ones winning: ``chat_template`` in ``tokenizer_config.json`` (a string, or a
    list of ``{"name", "template"}``), ``chat_template.jinja`` (the default) and
    ``additional_chat_templates/<name>.jinja``; ``chat_template.json`` only when none of them exists.

    Args:
        root: The model directory.
        tokenizer_config: The parsed ``tokenizer_config.json`` (``{}`` when absent).

    Returns:
        The templates' Jinja sources by name; empty when the model has none.

    Raises:
        TokenizerError: a template entry is malformed or a template file cannot be read.
    """
    config_path = root / "tokenizer_config.json"
    templates: dict[str, str] = {}
    value = tokenizer_config.get("chat_template")
    if isinstance(value, str):
        templates["default"] = value
    elif isinstance(value, list):
        for entry in value:
            if not (
                isinstance(entry, dict)
                and isinstance(entry.get("name"), str)
                and isinstance(entry.get("template"), str)
            ):
                raise TokenizerError(f"chat_template entries in {config_path} must be {{'name', 'template'}} dicts")
            templates[entry["name"]] = entry["template"]
    elif value is not None:
        raise TokenizerError(f"chat_template in {config_path} must be a str or a list, got {type(value).__name__}")
    files = [("default", root / "chat_template.jinja")]
    extra_dir = root / "additional_chat_templates"
    if extra_dir.is_dir():
        files += [(p.stem, p) for p in sorted(extra_dir.glob("*.jinja"))]
    legacy = root / "chat_template.json"
    try:
        for key, path in files:
            if path.is_file():
                templates[key] = path.read_text(encoding="utf-8")
        # Processor-style directories (multimodal checkpoints) keep it in chat_template.json.
        if not templates and legacy.is_file():
            data = json.loads(legacy.read_text(encoding="utf-8"))
            if isinstance(data, dict) and isinstance(data.get("chat_template"), str):
                templates["default"] = data["chat_template"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read a chat template in {root}: {e}") from e
    return templates

"""Structured output in requests: OpenAI ``response_format``, Ollama ``format`` and lmx's
``grammar`` extension, turned into a :class:`lmx.Constraint` and checked before the request runs.

- OpenAI chat: ``response_format`` ``{"type": "text"}`` (nothing), ``{"type": "json_object"}``
  (any JSON object), ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...},
  "strict": true}}`` (a JSON value matching the schema; the schema is always enforced).
- Ollama ``/api/chat`` and ``/api/generate``: ``format: "json"`` or a JSON schema object.
- lmx extension on ``/v1/chat/completions`` and ``/v1/completions``: ``"grammar": {"type":
  "lark" | "regex" | "json", "value": "..."}`` (``json``: the value is a JSON schema as text;
  this is how :class:`lmx.RemoteBackend` sends any ``constraint``).

A malformed field, or a schema or grammar that does not compile (an unsupported JSON-schema
keyword, a regex syntax error...), is a 400 whose ``param`` names the field and whose message
names the feature.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.concurrency import run_in_threadpool

from lmx.errors import InvalidOptionError
from lmx.generate.constraints import Constraint
from lmx.server.errors import ApiRequestError, UnsupportedParameterError

RESPONSE_FORMATS = ("text", "json_object", "json_schema")
GRAMMAR_TYPES = ("lark", "regex", "json")


def response_format_constraint(response_format: dict[str, Any] | None) -> Constraint | None:
    """The constraint of an OpenAI ``response_format`` (None for text or none given).

    Raises:
        ApiRequestError: an unknown type, or a ``json_schema`` without a schema object.
    """
    if response_format is None:
        return None
    kind = response_format.get("type", "text")
    if kind not in RESPONSE_FORMATS:
        raise UnsupportedParameterError(
            f"response_format.type must be one of {', '.join(RESPONSE_FORMATS)}, got {kind!r:.40}",
            param="response_format.type",
        )
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint.json(None)
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise ApiRequestError(
            "response_format.json_schema must be an object holding 'name' and 'schema'",
            param="response_format.json_schema",
        )
    schema = spec.get("schema", {"type": "object"})
    if not isinstance(schema, dict):
        raise ApiRequestError(
            f"response_format.json_schema.schema must be a JSON schema object, got {type(schema).__name__}",
            param="response_format.json_schema.schema",
        )
    return _build(lambda: Constraint.json(schema), "response_format")


def grammar_constraint(grammar: dict[str, Any] | None) -> Constraint | None:
    """The constraint of lmx's ``grammar`` field: ``{"type": "lark" | "regex" | "json", "value": "..."}``.

    Raises:
        ApiRequestError: another type, or a value that is not a non-empty string.
    """
    if grammar is None:
        return None
    kind, value = grammar.get("type"), grammar.get("value")
    if kind not in GRAMMAR_TYPES:
        raise ApiRequestError(
            f"grammar.type must be one of {', '.join(GRAMMAR_TYPES)}, got {kind!r:.40}", param="grammar.type"
        )
    if not isinstance(value, str) or not value.strip():
        raise ApiRequestError(
            f"grammar.value must be a non-empty string (the {kind} source), got {type(value).__name__}",
            param="grammar.value",
        )
    if kind == "json":
        try:
            schema = json.loads(value)
        except ValueError as e:
            raise ApiRequestError(f"grammar.value must be a JSON schema as text: {e}", param="grammar.value") from None
        return _build(lambda: Constraint.json(schema), "grammar")
    return _build(lambda: Constraint.lark(value) if kind == "lark" else Constraint.regex(value), "grammar")


def ollama_constraint(fmt: Any) -> Constraint | None:
    """The constraint of Ollama's ``format``: ``"json"`` or a JSON schema object ("" or None: none).

    Raises:
        ApiRequestError: another string or type.
    """
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return Constraint.json(None)
    if isinstance(fmt, dict):
        return _build(lambda: Constraint.json(fmt), "format")
    raise ApiRequestError(f'format must be "json" or a JSON schema object, got {fmt!r:.60}', param="format")


def openai_constraint(response_format: dict[str, Any] | None, grammar: dict[str, Any] | None) -> Constraint | None:
    """The constraint of an OpenAI request: from ``response_format`` or ``grammar`` (not both).

    Raises:
        ApiRequestError: both are given, or either is malformed.
    """
    from_format = response_format_constraint(response_format)
    from_grammar = grammar_constraint(grammar)
    if from_format is not None and from_grammar is not None:
        raise ApiRequestError("give either a JSON response_format or a grammar, not both", param="grammar")
    return from_format or from_grammar


def constraint_param(response_format: dict[str, Any] | None, grammar: dict[str, Any] | None) -> str:
    """The request field a constraint came from (for the ``param`` of its errors)."""
    return "grammar" if grammar is not None else "response_format"


async def check_constraint(engine: Any, options: dict[str, Any], param: str) -> None:
    """Compile the request's constraint now (off the event loop; cached for the run), so a bad
    schema or grammar is a 400 naming ``param`` before anything streams.

    Raises:
        ApiRequestError: the schema or grammar does not compile; the message names the feature.
    """
    constraint = options.get("constraint")
    scheduler = getattr(engine, "scheduler", None)
    if constraint is None or scheduler is None:  # a remote engine checks on its own server
        return
    try:
        await run_in_threadpool(scheduler.constraints.compile, constraint)
    except InvalidOptionError as e:
        raise ApiRequestError(f"{param}: {e}", param=param) from None


async def check_tool_constraint(engine: Any, tool_options: dict[str, Any], options: dict[str, Any]) -> None:
    """Check the constraint a forced tool call brings (``tool_choice`` ``"required"`` or a named
    function), which cannot be combined with a JSON ``response_format``, ``format`` or ``grammar``.

    Raises:
        ApiRequestError: both are asked for (``param`` ``"tool_choice"``), or the tools' parameter
            schemas do not compile (``param`` ``"tools"``, the unsupported feature named).
    """
    if "constraint" not in tool_options:
        return
    if options.get("constraint") is not None:
        raise ApiRequestError(
            "a forced tool call (tool_choice) cannot be combined with a JSON response format or a grammar",
            param="tool_choice",
        )
    await check_constraint(engine, tool_options, "tools")


def _build(make: Any, param: str) -> Constraint:
    try:
        return make()
    except InvalidOptionError as e:
        raise ApiRequestError(f"{param}: {e}", param=param) from None


__all__ = [
    "GRAMMAR_TYPES",
    "RESPONSE_FORMATS",
    "check_constraint",
    "check_tool_constraint",
    "constraint_param",
    "grammar_constraint",
    "ollama_constraint",
    "openai_constraint",
    "response_format_constraint",
]

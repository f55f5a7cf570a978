"""Request bodies of the OpenAI and Ollama endpoints, and their translation to engine options.

Validation is strict about types (``"0.5"`` is not a number) and about names: an OpenAI
request with a field this server does not know is refused with a 400 naming it, except for
a few bookkeeping fields that change nothing about the reply (``user``, ``store``...). Ollama
requests are lenient about unknown fields and options, as Ollama itself is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmx.server.errors import ApiRequestError, MalformedBodyError, UnsupportedParameterError
from lmx.server.images import image_url_part, ollama_images
from lmx.server.structured import ollama_constraint, openai_constraint
from lmx.server.tool_choice import tool_message_fields

ROLES = ("system", "developer", "user", "assistant", "tool")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _OpenAISampling(BaseModel):
    """Sampling fields shared by chat and text completions (OpenAI names, plus a few common extensions)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    repetition_context_size: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    max_tokens: int | None = None
    stop: str | list[str | int] | None = None  # token ids: an lmx extension
    seed: int | None = None
    logit_bias: dict[str, float] | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_token_ids: bool = False
    grammar: dict[str, Any] | None = None  # lmx extension: {"type": "lark" | "regex", "value": ...}
    # lmx extensions: speculative decoding ("prompt-lookup", "draft-model"; null: off for this request)
    speculative: str | None = None
    num_draft_tokens: int | None = None
    prompt_lookup_ngram: int | None = None
    # Bookkeeping fields: accepted and ignored, they do not change the reply.
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None


class ChatCompletionRequest(_OpenAISampling):
    """``POST /v1/chat/completions``."""

    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    pan_and_scan: bool | None = None  # lmx extension: crops of long images (None: the checkpoint's config)


class CompletionRequest(_OpenAISampling):
    """``POST /v1/completions``."""

    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class OllamaChatRequest(BaseModel):
    """``POST /api/chat``."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str
    messages: list[dict[str, Any]] = Field(default_factory=list)
    stream: bool = True
    options: dict[str, Any] | None = None
    format: Any = None
    tools: list[Any] | None = None
    think: bool | str | None = None
    keep_alive: Any = None


class OllamaGenerateRequest(BaseModel):
    """``POST /api/generate``."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    stream: bool = True
    options: dict[str, Any] | None = None
    format: Any = None
    images: list[Any] | None = None
    template: str | None = None
    context: list[int] | None = None
    suffix: str | None = None
    think: bool | str | None = None
    keep_alive: Any = None


class ClassifyExample(BaseModel):
    """One worked example of ``POST /v1/classify``."""

    model_config = ConfigDict(extra="forbid", strict=True)
    text: str
    label: str


class ClassifyRequest(BaseModel):
    """``POST /v1/classify`` (an lmx extension; see :mod:`lmx.server.routes_classify`)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    texts: list[str]
    labels: list[str]
    examples: list[ClassifyExample] | None = None
    instruction: str | None = None
    max_text_tokens: int | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    user: str | None = None  # bookkeeping, as on the completion endpoints


def parse_body(model: type[BaseModel], body: bytes) -> Any:
    """Validate a JSON request body against ``model``.

    Raises:
        MalformedBodyError: the body is not a JSON object.
        ApiRequestError: a field is missing, unknown, or of the wrong type (``param`` names it).
    """
    try:
        return model.model_validate_json(body or b"")
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        loc = first.get("loc", ())
        if first["type"] == "json_invalid":
            _raise_for_huge_number(body)
        if first["type"] == "json_invalid" or (not loc and first["type"] in ("model_type", "model_attributes_type")):
            raise MalformedBodyError(f"the request body must be a JSON object: {first['msg']}") from None
        param = _param_name(loc)
        if first["type"] == "extra_forbidden":
            raise ApiRequestError(f"unrecognized request argument {param!r}", param=param) from None
        if first["type"] == "missing":
            raise ApiRequestError(f"missing required parameter {param!r}", param=param) from None
        got = first.get("input")
        raise ApiRequestError(f"invalid value for {param!r}: {first['msg']} (got {got!r:.80})", param=param) from None


MAX_JSON_DIGITS = 4300
"""The most digits an integer in a request body may have (Python's own int/str limit)."""


class _HugeInt:
    def __init__(self, digits: int) -> None:
        self.digits = digits


def _raise_for_huge_number(body: bytes) -> None:
    """Raise a 400 naming the field when a body is JSON but holds an integer too long to parse.

    The JSON parser only says "number out of range at column N"; parsing again with a hook
    that marks long integers finds the field. Only runs for bodies that failed to parse.

    Raises:
        ApiRequestError: the body holds an integer of more than ``MAX_JSON_DIGITS`` digits.
    """

    def parse_int(text: str) -> Any:
        digits = len(text.lstrip("-"))
        return _HugeInt(digits) if digits > MAX_JSON_DIGITS else int(text)

    try:
        data = json.loads(body, parse_int=parse_int)
    except (ValueError, RecursionError):  # not JSON after all (or nested too deep): the caller's 422
        return
    stack: list[tuple[tuple[Any, ...], Any]] = [((), data)]
    while stack:
        loc, value = stack.pop()
        if isinstance(value, _HugeInt):
            param = _param_name(loc) or "body"
            raise ApiRequestError(
                f"invalid value for {param!r}: an integer of {value.digits} digits; "
                f"numbers in a request may have at most {MAX_JSON_DIGITS} digits",
                param=param,
            )
        if isinstance(value, dict):
            stack.extend(((*loc, str(k)), v) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend(((*loc, i), v) for i, v in reversed(list(enumerate(value))))


_UNION_MEMBERS = frozenset({"str", "int", "float", "bool"})  # pydantic's names of plain union members in a loc


def _param_name(loc: tuple[Any, ...]) -> str:
    # pydantic adds the union member tried ("str", "list[int]") to the location: drop those.
    parts = [p for p in loc if isinstance(p, int) or (p.isidentifier() and p not in _UNION_MEMBERS)]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


# ---------------------------------------------------------------- messages
def chat_messages(
    messages: list[dict[str, Any]], param: str = "messages", image_dir: Path | None = None
) -> list[dict[str, Any]]:
    """OpenAI/Ollama messages -> engine messages (``{"role", "content"}``).

    ``developer`` becomes ``system``; content parts of type ``text`` are joined. A message with
    images (OpenAI ``image_url`` parts, Ollama ``images``) keeps a list of text and image parts
    (see :mod:`lmx.server.images`; ``image_dir``: where local image paths may point, None: nowhere).

    Raises:
        ApiRequestError: a message or an image part is malformed.
        UnsupportedParameterError: a content part is neither text nor an image (audio...).
    """
    out = []
    for i, message in enumerate(messages):
        where = f"{param}[{i}]"
        role = message.get("role")
        if role not in ROLES:
            raise ApiRequestError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r:.40}", param=where)
        content = message.get("content")
        parts: list[dict[str, Any]] = []
        if isinstance(content, list):
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image_url":
                    parts.append(image_url_part(part, f"{where}.content[{j}]", image_dir))
                    continue
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise UnsupportedParameterError(
                        f"{where}.content[{j}]: only text and image_url content parts are supported, "
                        f"got type {kind!r:.40}",
                        param=f"{where}.content",
                    )
                parts.append({"type": "text", "text": part["text"]})
            content = "".join(p["text"] for p in parts if p["type"] == "text")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise ApiRequestError(
                f"{where}.content must be a string or a list of text parts, got {type(content).__name__}",
                param=f"{where}.content",
            )
        if message.get("images"):  # Ollama: the images go before the message's text
            parts = ollama_images(message["images"], f"{where}.images") + (parts or [{"type": "text", "text": content}])
        has_image = any(p["type"] == "image" for p in parts)
        out.append({"role": "system" if role == "developer" else role, "content": parts if has_image else content})
        out[-1].update(tool_message_fields(message, where))
    return out


# ---------------------------------------------------------------- chat template arguments
# Keys of chat_template_kwargs that are arguments of the renderer, not template variables.
_RENDER_ARGUMENTS = ("add_generation_prompt", "template_limits")


def template_kwargs(kwargs: dict[str, Any] | None, *, allow_template: bool) -> dict[str, Any]:
    """The template variables of a request's ``chat_template_kwargs``.

    Args:
        kwargs: the request's ``chat_template_kwargs``.
        allow_template: whether the server lets a request replace the chat template.

    Raises:
        ApiRequestError: ``chat_template`` is given but not allowed, or a key is one of the
            renderer's own arguments (``add_generation_prompt``, ``template_limits``).
    """
    out = dict(kwargs or {})
    if "chat_template" in out and not allow_template:
        raise ApiRequestError(
            "chat_template_kwargs.chat_template: this server does not let requests replace the chat template "
            "(start it with --allow-request-chat-template to allow it)",
            param="chat_template_kwargs.chat_template",
        )
    for key in _RENDER_ARGUMENTS:
        if key in out:
            raise ApiRequestError(
                f"chat_template_kwargs.{key} cannot be set by a request", param=f"chat_template_kwargs.{key}"
            )
    return out


# ---------------------------------------------------------------- options
# Engine option name -> the OpenAI request field it comes from.
OPENAI_PARAMS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "repetition_context_size": "repetition_context_size",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "max_tokens": "max_tokens",
    "stop": "stop",
    "seed": "seed",
    "logit_bias": "logit_bias",
    "logprobs": "logprobs",
}


def openai_options(req: ChatCompletionRequest | CompletionRequest, default_max_tokens: int) -> dict[str, Any]:
    """Engine options of an OpenAI request (only the fields it set).

    Raises:
        UnsupportedParameterError: ``functions``, ``echo``, ``suffix``, ``best_of > 1``.
        ApiRequestError: a malformed ``response_format`` or ``grammar`` (see :mod:`lmx.server.structured`).
    """
    if req.stream_options is not None and not req.stream:
        raise ApiRequestError("stream_options is only allowed with stream=true", param="stream_options")
    opts: dict[str, Any] = {}
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "repetition_context_size",
                 "presence_penalty", "frequency_penalty", "seed", "logit_bias",
                 "num_draft_tokens", "prompt_lookup_ngram"):  # fmt: skip
        value = getattr(req, name)
        if value is not None:
            opts[name] = value
    if "speculative" in req.model_fields_set:  # an explicit null turns the server's default off
        opts["speculative"] = req.speculative
    if req.stop is not None:
        opts["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    max_tokens = req.max_tokens
    if isinstance(req, ChatCompletionRequest):
        if req.functions or req.function_call is not None:  # tools and tool_choice: see server/tool_choice.py
            name = "functions" if req.functions else "function_call"
            raise UnsupportedParameterError(f"{name} (deprecated) is not supported; use tools", param=name)
        if req.max_completion_tokens is not None:
            max_tokens = req.max_completion_tokens
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiRequestError("top_logprobs needs logprobs=true", param="top_logprobs")
        if req.logprobs:
            opts["logprobs"] = req.top_logprobs or 0
    else:
        if req.echo:
            raise UnsupportedParameterError("echo=true is not supported", param="echo")
        if req.suffix:
            raise UnsupportedParameterError("suffix (fill-in-the-middle) is not supported", param="suffix")
        if req.best_of not in (None, 1):
            raise UnsupportedParameterError(f"best_of must be 1, got {req.best_of}", param="best_of")
        if req.logprobs is not None:
            opts["logprobs"] = req.logprobs
    opts["max_tokens"] = default_max_tokens if max_tokens is None else max_tokens
    constraint = openai_constraint(getattr(req, "response_format", None), req.grammar)
    if constraint is not None:
        opts["constraint"] = constraint
    return opts


def completion_prompts(req: CompletionRequest, max_prompts: int) -> list[str | list[int]]:
    """The prompts of a text-completion request (each text, or token ids): one, or a list as
    the OpenAI API allows, answered with one choice per prompt.

    Raises:
        UnsupportedParameterError: more than ``max_prompts`` prompts, or several with ``stream``.
    """
    prompt = req.prompt
    if not (isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list))):
        return [prompt]  # type: ignore[list-item]
    if len(prompt) > max_prompts:
        raise UnsupportedParameterError(
            f"prompt may hold at most {max_prompts} prompts (the server's max_concurrency), got {len(prompt)}",
            param="prompt",
        )
    if len(prompt) > 1 and req.stream:
        raise UnsupportedParameterError(
            f"stream needs one prompt, got a list of {len(prompt)}; send one request per prompt", param="prompt"
        )
    return list(prompt)  # type: ignore[arg-type]


# Ollama option name -> engine option name. Other Ollama options (num_ctx, num_thread, mirostat...)
# tune Ollama's runtime and are ignored here, as Ollama ignores options it does not know.
OLLAMA_OPTIONS = {
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "num_predict": "max_tokens",
    "stop": "stop",
    "seed": "seed",
    "repeat_penalty": "repetition_penalty",
    "repeat_last_n": "repetition_context_size",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "speculative": "speculative",  # lmx extensions: speculative decoding
    "num_draft_tokens": "num_draft_tokens",
    "prompt_lookup_ngram": "prompt_lookup_ngram",
}


def ollama_options(req: OllamaChatRequest | OllamaGenerateRequest, default_max_tokens: int) -> dict[str, Any]:
    """Engine options of an Ollama request.

    ``num_predict`` < 0 (Ollama's "no limit") means up to the end of the context.

    Raises:
        ApiRequestError: ``format`` is neither "json" nor a schema object.
    """
    opts: dict[str, Any] = {"max_tokens": default_max_tokens}
    for name, value in (req.options or {}).items():
        engine_name = OLLAMA_OPTIONS.get(name)
        if engine_name is None or value is None:
            continue
        if engine_name == "max_tokens" and isinstance(value, int) and not isinstance(value, bool) and value < 0:
            continue
        opts[engine_name] = [value] if engine_name == "stop" and isinstance(value, str) else value
    constraint = ollama_constraint(req.format)
    if constraint is not None:
        opts["constraint"] = constraint
    return opts


OLLAMA_PARAMS = {engine: f"options.{name}" for name, engine in OLLAMA_OPTIONS.items()}


def image_options(pan_and_scan: Any, param: str = "pan_and_scan") -> dict[str, Any]:
    """The keyword arguments of ``engine.stream_chat`` for a request's image options: none when
    ``pan_and_scan`` is absent (the checkpoint's processor config decides), else that bool.

    Raises:
        ApiRequestError: ``pan_and_scan`` is not a bool (Ollama's lenient ``options`` let anything in).
    """
    if pan_and_scan is None:
        return {}
    if not isinstance(pan_and_scan, bool):
        raise ApiRequestError(f"{param} must be true or false, got {pan_and_scan!r:.40}", param=param)
    return {"pan_and_scan": pan_and_scan}


def ollama_image_options(req: OllamaChatRequest | OllamaGenerateRequest) -> dict[str, Any]:
    """:func:`image_options` of an Ollama request's ``options.pan_and_scan`` (an lmx extension).

    Raises:
        ApiRequestError: ``options.pan_and_scan`` is not a bool.
    """
    return image_options((req.options or {}).get("pan_and_scan"), "options.pan_and_scan")

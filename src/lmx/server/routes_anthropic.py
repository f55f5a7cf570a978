"""Anthropic Messages API: ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``, so
Claude Code and other Anthropic-SDK tools can talk to lmx.

A request runs through the same path as ``/v1/chat/completions``: its messages are rendered
by the model's chat template and the request is one row of the engine's scheduler (greedy,
the reply is the chat route's reply token for token). The reply is a ``message`` object, or
(``stream: true``) server-sent events in Anthropic's sequence: ``message_start``,
``content_block_start``, ``ping``, ``content_block_delta`` (``text_delta``) per piece of text,
``content_block_stop``, ``message_delta`` (``stop_reason``, ``stop_sequence``,
``usage.output_tokens``), ``message_stop``; an error after the start is an ``error`` event.
A client that disconnects stops its generation.

``stop_reason`` is ``end_turn`` (the model ended its turn), ``max_tokens``, or
``stop_sequence`` (with ``stop_sequence`` set to the one that matched). ``usage`` follows
Anthropic's accounting: ``input_tokens`` are the prompt tokens computed for this request,
``cache_read_input_tokens`` those reused from the prefix cache (their sum is what
``count_tokens`` counts), ``cache_creation_input_tokens`` is always 0.

A last message of role ``assistant`` is a prefill: the reply continues it (and holds only
the continuation; not in a conversation with images). Images: ``image`` blocks with a
``base64`` source (see :mod:`lmx.server.schemas_anthropic`), for a model with a vision tower;
``pan_and_scan`` (an lmx extension, true or false) sets Gemma 3's crops of long images for the
request. Errors are Anthropic-shaped:
``{"type": "error", "error": {"type", "message"}}`` with the status of the same error on the
OpenAI routes. Tools: see :mod:`lmx.server.anthropic_tools`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lmx.generate.images import has_images, lay_out
from lmx.generate.tools import plan_tools
from lmx.server.anthropic_tools import (
    ToolCalling,
    openai_tool_choice,
    openai_tools,
    reply_content,
    tool_calling,
    tool_use_events,
)
from lmx.server.common import (
    CLIENT_GONE,
    JobStreamingResponse,
    ServerState,
    check_options,
    collect,
    events_after,
    first_event,
    one_line_json,
    read_body,
    request_id,
    server_state,
    start_job,
    track,
)
from lmx.server.errors import UnsupportedParameterError, error_body
from lmx.server.jobs import Job
from lmx.server.schemas import image_options, parse_body
from lmx.server.schemas_anthropic import (
    ANTHROPIC_PARAMS,
    CountTokensRequest,
    MessagesRequest,
    anthropic_options,
    check_thinking,
    engine_messages,
    uses_tools,
)

PREFIX = "/v1/messages"  # the routes answered in Anthropic's error shape
# Request headers Anthropic SDKs send from a browser (allowed by CORS when --cors-origin is set).
CORS_HEADERS = ("x-api-key", "anthropic-version", "anthropic-beta", "anthropic-dangerous-direct-browser-access")

# HTTP status -> Anthropic error type (anything else: invalid_request_error below 500, api_error above).
ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def is_anthropic_path(path: str) -> bool:
    """Whether ``path`` is one of the Anthropic routes (answered in Anthropic's error shape)."""
    return path == PREFIX or path.startswith(PREFIX + "/")


def anthropic_error_body(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """The status and Anthropic-shaped body answering ``exc`` (status and message as on the
    OpenAI routes)."""
    status, body = error_body(exc)
    kind = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return status, {"type": "error", "error": {"type": kind, "message": body["error"]["message"]}}


def anthropic_error_response(exc: BaseException) -> JSONResponse:
    """The JSON response answering ``exc`` on an Anthropic route (503s say when to retry)."""
    status, body = anthropic_error_body(exc)
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse(body, status_code=status, headers=headers)


def _endpoint(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except Exception as e:
            return anthropic_error_response(e)

    wrapped.__name__ = handler.__name__
    wrapped.__doc__ = handler.__doc__
    return wrapped


def event(data: dict[str, Any]) -> bytes:
    """One server-sent event named after its ``type``, as Anthropic sends them."""
    return f"event: {data['type']}\ndata: {one_line_json(data)}\n\n".encode()


# ---------------------------------------------------------------- requests -> engine
ToolsOfRequest = tuple[ToolCalling, list[dict[str, Any]], Any]  # (how, OpenAI tools, OpenAI tool_choice)


def _tools(
    state: ServerState, req: MessagesRequest | CountTokensRequest, messages: list[dict[str, Any]]
) -> ToolsOfRequest | None:
    """The request's tools as (ToolCalling, OpenAI tools, OpenAI tool_choice), or None without tools.

    Raises:
        UnsupportedParameterError: the request has tools (or tool blocks) and the engine cannot run them.
    """
    if not req.tools and not uses_tools(messages):
        if req.tool_choice is not None:
            raise UnsupportedParameterError("tool_choice needs tools", param="tool_choice")
        return None
    tooling = tool_calling(state.engine)
    if tooling is None:
        raise UnsupportedParameterError(
            "tools are not supported yet (tools, tool_choice, tool_use and tool_result blocks)",
            param="tools" if req.tools else "messages",
        )
    tools = openai_tools(req.tools or [])
    choice, _ = openai_tool_choice(req.tool_choice, [t["function"]["name"] for t in tools])
    return tooling, tools, choice


def _prompt_ids(
    state: ServerState, messages: list[dict[str, Any]], extra: dict[str, Any], pan_and_scan: bool | None = None
) -> list[int]:
    """The prompt's token ids: the conversation rendered for the assistant's turn, plus the
    text of a last assistant message (a prefill) when there is one. Images take their soft
    tokens, laid out as the engine lays them out."""
    tokenizer = state.engine.tokenizer
    kwargs = state.template_kwargs(extra)
    if has_images(messages):
        _check_no_prefill(messages)
        tools = kwargs.pop("tools", None)
        plan = plan_tools(tokenizer, messages, tools, None, kwargs.get("chat_template"))
        loaded = getattr(state.engine, "loaded", None)  # None: a remote engine, whose images its server reads
        layout = lay_out(
            tokenizer,
            getattr(loaded, "model", None),
            getattr(loaded, "image_processor", None),
            plan.messages,
            model_name=state.model_id,
            tools=plan.template_tools,
            template_kwargs=kwargs,
            pan_and_scan=pan_and_scan,
        )
        return layout.ids
    prefill = messages[-1]["content"] if _has_prefill(messages) else None
    head = messages[:-1] if prefill is not None else messages
    ids = list(tokenizer.encode_chat(head, add_generation_prompt=True, **kwargs))
    if prefill:
        ids += tokenizer.encode(prefill, add_special_tokens=False)
    return ids


def _has_prefill(messages: list[dict[str, Any]]) -> bool:
    last = messages[-1]
    return last["role"] == "assistant" and not last.get("tool_calls")


def _check_no_prefill(messages: list[dict[str, Any]]) -> None:
    """A conversation with images is rendered for the assistant's turn by the engine, which
    takes no prefill.

    Raises:
        UnsupportedParameterError: the last message is an assistant prefill.
    """
    if _has_prefill(messages):
        raise UnsupportedParameterError(
            "a last assistant message (a prefill) is not supported in a conversation with images",
            param=f"messages[{len(messages) - 1}]",
        )


# ---------------------------------------------------------------- engine -> reply
class _Reply:
    """Turns one request's tokens into Anthropic message objects and events."""

    def __init__(self, state: ServerState, stops: list[str]) -> None:
        self.state = state
        self.stops = [s for s in stops if s]
        self.id = request_id("msg")
        self.created = int(time.time())

    def stop(self, stream: Any) -> tuple[str, str | None]:
        """``(stop_reason, stop_sequence)`` of a finished stream."""
        if stream.finish_reason == "length":
            return "max_tokens", None
        matched = self._matched_stop(stream)
        return ("stop_sequence", matched) if matched is not None else ("end_turn", None)

    def _matched_stop(self, stream: Any) -> str | None:
        """The stop sequence that ended the stream, if one did: its text and the one after
        it are cut from the reply, so it is found at the start of what the generated tokens
        decode to beyond the reply's text (the earliest, and the shortest of those)."""
        if not self.stops or stream.finish_reason != "stop":
            return None
        full = self.state.engine.tokenizer.decode(stream.tokens)
        rest = full[len(stream.text) :] if full.startswith(stream.text) else full
        found = [(rest.find(s), len(s), s) for s in self.stops if s in rest]
        return min(found)[2] if found else None

    @staticmethod
    def usage(stream: Any) -> dict[str, int]:
        m = stream.metrics
        return {
            "input_tokens": m.prompt_tokens - m.cached_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": m.cached_tokens,
            "output_tokens": len(stream.tokens),
        }

    def message(
        self, content: list[dict[str, Any]], stop_reason: str | None, stop_sequence: str | None, usage: Any
    ) -> dict[str, Any]:
        """A ``message`` object."""
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.state.model_id,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": usage,
        }

    def start_event(self, stream: Any) -> dict[str, Any]:
        usage = {**self.usage(stream), "output_tokens": 0}
        return {"type": "message_start", "message": self.message([], None, None, usage)}

    def end_events(self, stream: Any, stop_reason: str, stop_sequence: str | None) -> list[dict[str, Any]]:
        delta = {"stop_reason": stop_reason, "stop_sequence": stop_sequence}
        return [
            {"type": "message_delta", "delta": delta, "usage": {"output_tokens": len(stream.tokens)}},
            {"type": "message_stop"},
        ]


def _text_events(index: int, text: str) -> list[dict[str, Any]]:
    events = [{"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}]
    if text:
        events.append({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}})
    return events + [{"type": "content_block_stop", "index": index}]


async def _respond(request: Request, job: Job, reply: _Reply, stream: bool) -> Response:
    if not stream:
        tokens = await collect(job, request)
        if tokens is None:
            return Response(status_code=CLIENT_GONE)
        stop_reason, stop_sequence = reply.stop(job.stream)
        content = [{"type": "text", "text": "".join(t.text for t in tokens)}]
        return JSONResponse(reply.message(content, stop_reason, stop_sequence, reply.usage(job.stream)))
    first = await first_event(job, request)
    if first is None:
        return Response(status_code=CLIENT_GONE)

    async def body() -> AsyncIterator[bytes]:
        yield event(reply.start_event(job.stream))
        yield event({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
        yield event({"type": "ping"})
        async for ev in events_after(job, first):
            if ev.kind == "token":
                assert ev.token is not None
                if ev.token.text:
                    delta = {"type": "text_delta", "text": ev.token.text}
                    yield event({"type": "content_block_delta", "index": 0, "delta": delta})
            elif ev.kind == "end":
                yield event({"type": "content_block_stop", "index": 0})
                for e in reply.end_events(job.stream, *reply.stop(job.stream)):
                    yield event(e)
            else:
                assert ev.error is not None
                yield event(anthropic_error_body(ev.error)[1])

    return JobStreamingResponse(body(), job, "text/event-stream")


async def _respond_with_tools(
    request: Request, job: Job, reply: _Reply, tooling: ToolCalling, stream: bool
) -> Response:
    """Tool calls are parsed from the whole reply, so it is collected first, then answered
    (streaming: all events at once)."""
    tokens = await collect(job, request)
    if tokens is None:
        return Response(status_code=CLIENT_GONE)
    text, calls = tooling.parse("".join(t.text for t in tokens))
    finish, matched = reply.stop(job.stream)
    content, stop_reason = reply_content(text, calls, finish)
    stop_sequence = matched if stop_reason == "stop_sequence" else None
    if not stream:
        return JSONResponse(reply.message(content, stop_reason, stop_sequence, reply.usage(job.stream)))
    events = [reply.start_event(job.stream), {"type": "ping"}]
    for index, block in enumerate(content):
        events += _text_events(index, block["text"]) if block["type"] == "text" else tool_use_events(index, block)
    events += reply.end_events(job.stream, stop_reason, stop_sequence)
    return Response(b"".join(event(e) for e in events), media_type="text/event-stream")


# ---------------------------------------------------------------- routes
async def messages(request: Request) -> Response:
    """``POST /v1/messages``."""
    state = server_state(request)
    req = parse_body(MessagesRequest, await read_body(request, state.settings.max_body_bytes))
    adapter = state.adapter_for(req.model)
    check_thinking(req.thinking)
    conversation = engine_messages(req)
    options = {**anthropic_options(req), "adapter": adapter}
    check_options(options, ANTHROPIC_PARAMS, state.info.vocab_size)
    tools = _tools(state, req, conversation)
    reply = _Reply(state, options.get("stop", []))
    # an image option, not a generation option: check_options never sees it
    image_kw = image_options(req.pan_and_scan)
    if tools is not None:
        tooling, functions, choice = tools
        extra = {**tooling.stream_options(functions, choice), **image_kw}
        job = await start_job(
            state,
            lambda sink: state.engine.stream_chat(
                conversation, chat_template_kwargs=state.template_kwargs({}), sink=sink, **extra, **options
            ),
        )
        track(request, job)
        return await _respond_with_tools(request, job, reply, tooling, req.stream)
    if has_images(conversation):
        _check_no_prefill(conversation)
    if _has_prefill(conversation):
        job = await start_job(
            state, lambda sink: state.engine.stream(_prompt_ids(state, conversation, {}), sink=sink, **options)
        )
    else:  # the chat route's path exactly
        kwargs = state.template_kwargs({})
        job = await start_job(
            state,
            lambda sink: state.engine.stream_chat(
                conversation, chat_template_kwargs=kwargs, sink=sink, **image_kw, **options
            ),
        )
    track(request, job)
    return await _respond(request, job, reply, req.stream)


async def count_tokens(request: Request) -> Response:
    """``POST /v1/messages/count_tokens``: ``{"input_tokens": N}``, the prompt tokens the
    same request to ``/v1/messages`` would have (``input_tokens + cache_read_input_tokens``
    of its usage)."""
    state = server_state(request)
    req = parse_body(CountTokensRequest, await read_body(request, state.settings.max_body_bytes))
    state.adapter_for(req.model)  # an adapter's prompt has the same tokens
    check_thinking(req.thinking)
    conversation = engine_messages(req)
    tools = _tools(state, req, conversation)
    extra = {"tools": tools[1]} if tools is not None else {}
    ids = await run_in_threadpool(_prompt_ids, state, conversation, extra, req.pan_and_scan)
    return JSONResponse({"input_tokens": len(ids)})


def routes() -> list[Route]:
    return [
        Route(PREFIX, _endpoint(messages), methods=["POST"]),
        Route(PREFIX + "/count_tokens", _endpoint(count_tokens), methods=["POST"]),
    ]

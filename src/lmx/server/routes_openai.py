"""OpenAI-compatible endpoints: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``.

Both completion endpoints answer with one JSON object, or (``stream: true``) with
server-sent events, one chunk per generated token, ending with ``data: [DONE]``; with
``stream_options.include_usage`` a last chunk with empty ``choices`` carries ``usage``.

Extensions a plain OpenAI client ignores: ``top_k``, ``min_p``, ``repetition_penalty`` and
``chat_template_kwargs`` in requests; ``return_token_ids: true`` adds ``token_ids`` to each
choice (and ``id`` to each chat logprob entry, ``top_logprobs_by_id`` to text logprobs); usage chunks and full replies carry the engine's
``metrics`` (tokens/s, time to first token).
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lmx.generate.tools import plan_tools
from lmx.results import Token
from lmx.server import choices
from lmx.server.common import (
    CLIENT_GONE,
    JobStreamingResponse,
    ServerState,
    check_options,
    collect,
    endpoint,
    events_after,
    first_event,
    read_body,
    request_id,
    server_state,
    sse,
    start_job,
    track,
)
from lmx.server.errors import error_body
from lmx.server.jobs import Job
from lmx.server.schemas import (
    OPENAI_PARAMS,
    ChatCompletionRequest,
    CompletionRequest,
    chat_messages,
    completion_prompts,
    image_options,
    openai_options,
    parse_body,
    template_kwargs,
)
from lmx.server.structured import check_constraint, check_tool_constraint, constraint_param
from lmx.server.tool_choice import ToolCallFormat, engine_tool_options, request_tools

Kind = Literal["chat", "text"]
FLOOR_LOGPROB = -9999.0  # JSON has no -Infinity: a token ruled out by top_k/top_p/min_p gets this, as OpenAI does


def _lp(value: float) -> float:
    return value if math.isfinite(value) else FLOOR_LOGPROB


class _Format:
    """Turns engine tokens into OpenAI chat or text-completion objects for one request."""

    def __init__(
        self, state: ServerState, kind: Kind, logprobs: int | None, token_ids: bool, adapter: str | None = None
    ) -> None:
        self.state, self.kind, self.logprobs, self.token_ids = state, kind, logprobs, token_ids
        self.model = adapter or state.model_id  # replies name the adapter that answered
        self.id = request_id("chatcmpl" if kind == "chat" else "cmpl")
        self.created = int(time.time())
        self.offset = 0  # text offset of the next token (text completions' logprobs)
        self.sent_role = False

    def _piece(self, tid: int) -> str:
        return self.state.engine.tokenizer.decode([tid], skip_special_tokens=False)

    def _chat_logprob(self, token: Token) -> dict[str, Any]:
        def entry(tid: int, lp: float) -> dict[str, Any]:
            piece = self._piece(tid)
            out: dict[str, Any] = {"token": piece, "logprob": _lp(lp), "bytes": list(piece.encode())}
            if self.token_ids:
                out["id"] = tid
            return out

        top = [entry(t, lp) for t, lp in token.top_logprobs or ()]
        return {**entry(token.id, token.logprob), "top_logprobs": top}

    def _text_logprobs(self, tokens: list[Token]) -> dict[str, Any]:
        pieces, offsets = [], []
        for token in tokens:
            pieces.append(self._piece(token.id))
            offsets.append(self.offset)
            self.offset += len(token.text)
        tops = None
        if self.logprobs:
            tops = [{self._piece(t): _lp(lp) for t, lp in token.top_logprobs or ()} for token in tokens]
        out = {
            "tokens": pieces,
            "token_logprobs": [_lp(t.logprob) for t in tokens],
            "top_logprobs": tops,
            "text_offset": offsets,
        }
        if self.token_ids and self.logprobs:  # pieces can collide as dict keys; ids cannot
            out["top_logprobs_by_id"] = [[[i, _lp(lp)] for i, lp in t.top_logprobs or ()] for t in tokens]
        return out

    def _logprobs(self, tokens: list[Token]) -> dict[str, Any] | None:
        if self.logprobs is None:
            return None
        if self.kind == "chat":
            return {"content": [self._chat_logprob(t) for t in tokens], "refusal": None}
        return self._text_logprobs(tokens)

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def chunk(self, token: Token) -> dict[str, Any] | None:
        """The streamed chunk of one token (None when it carries nothing)."""
        if not token.text and token.finish_reason is None and self.logprobs is None and not self.token_ids:
            return None
        choice: dict[str, Any] = {"index": 0}
        if self.kind == "chat":
            delta: dict[str, Any] = {"content": token.text}
            if not self.sent_role:
                delta = {"role": "assistant", **delta}
                self.sent_role = True
            choice["delta"] = delta
        else:
            choice["text"] = token.text
        choice["logprobs"] = self._logprobs([token])
        choice["finish_reason"] = token.finish_reason
        if self.token_ids:
            choice["token_ids"] = [token.id]
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return self._envelope(obj, [choice])

    def usage(self, stream: Any) -> dict[str, Any]:
        m = stream.metrics
        completion = len(stream.tokens)
        return {
            "prompt_tokens": m.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": m.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": m.cached_tokens},
        }

    def usage_chunk(self, stream: Any) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._envelope(obj, []), "usage": self.usage(stream), "metrics": stream.metrics.as_dict()}

    def completion(self, tokens: list[Token], stream: Any) -> dict[str, Any]:
        """The whole reply of a non-streaming request."""
        choice: dict[str, Any] = {"index": 0}
        text = "".join(t.text for t in tokens)
        if self.kind == "chat":
            choice["message"] = {"role": "assistant", "content": text, "refusal": None}
        else:
            choice["text"] = text
        choice["logprobs"] = self._logprobs(tokens)
        choice["finish_reason"] = stream.finish_reason or "length"
        if self.token_ids:
            choice["token_ids"] = [t.id for t in tokens]
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {**self._envelope(obj, [choice]), "usage": self.usage(stream), "metrics": stream.metrics.as_dict()}


async def _respond(request: Request, job: Job, fmt: Any, stream: bool, include_usage: bool) -> Response:
    if not stream:
        tokens = await collect(job, request)
        if tokens is None:
            return Response(status_code=CLIENT_GONE)
        return JSONResponse(fmt.completion(tokens, job.stream))
    first = await first_event(job, request)
    if first is None:
        return Response(status_code=CLIENT_GONE)

    async def body() -> AsyncIterator[bytes]:
        async for event in events_after(job, first):
            if event.kind == "token":
                assert event.token is not None
                chunk = fmt.chunk(event.token)
                if chunk is not None:
                    yield sse(chunk)
            elif event.kind == "end":
                if include_usage:
                    yield sse(fmt.usage_chunk(job.stream))
                yield sse("[DONE]")
            else:
                assert event.error is not None
                yield sse(error_body(event.error)[1])
                yield sse("[DONE]")

    return JobStreamingResponse(body(), job, "text/event-stream")


async def chat_completions(request: Request) -> Response:
    """``POST /v1/chat/completions``."""
    state = server_state(request)
    req = parse_body(ChatCompletionRequest, await read_body(request, state.settings.max_body_bytes))
    adapter = state.adapter_for(req.model)
    messages = chat_messages(req.messages, image_dir=state.image_dir)
    options = {**openai_options(req, state.default_max_tokens), "adapter": adapter}
    params = {**OPENAI_PARAMS, "logprobs": "top_logprobs"}
    if req.max_completion_tokens is not None:
        params["max_tokens"] = "max_completion_tokens"
    check_options(options, params, state.info.vocab_size)
    await check_constraint(state.engine, options, constraint_param(req.response_format, req.grammar))
    kwargs = template_kwargs(req.chat_template_kwargs, allow_template=state.settings.allow_request_chat_template)
    kwargs = state.template_kwargs(kwargs)
    tools, choice = request_tools(req.tools, req.tool_choice, state.engine)
    plan = plan_tools(state.engine.tokenizer, messages, tools, choice, kwargs.get("chat_template")) if tools else None
    tool_kw = engine_tool_options(tools, choice, plan)
    await check_tool_constraint(state.engine, tool_kw, options)
    tool_kw = {**tool_kw, **image_options(req.pan_and_scan)}  # with the image options: stream_chat's keywords
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    n = choices.check_n(req.n, state.settings.max_n)
    if n > 1:
        makers = [
            lambda sink, o=o: state.engine.stream_chat(messages, chat_template_kwargs=kwargs, sink=sink, **tool_kw, **o)
            for o in choices.choice_options(options, n)
        ]
        return await _respond_choices(request, state, "chat", makers, n, req, include_usage, plan)
    job = await start_job(
        state,
        lambda sink: state.engine.stream_chat(messages, chat_template_kwargs=kwargs, sink=sink, **tool_kw, **options),
    )
    track(request, job)
    fmt: Any = _Format(state, "chat", options.get("logprobs"), req.return_token_ids, adapter)
    if plan is not None and plan.parse:
        fmt = ToolCallFormat(fmt, plan)
    return await _respond(request, job, fmt, req.stream, include_usage)


async def _respond_choices(
    request: Request,
    state: ServerState,
    kind: Kind,
    makers: list[Any],
    n: int,
    req: Any,
    include_usage: bool,
    plan: Any = None,
) -> Response:
    """``n > 1``: every choice is a request of its own, answered together (see :mod:`choices`)."""
    group = await choices.start_jobs(request, state, makers)
    logprobs = (
        (req.top_logprobs or 0) if kind == "chat" and req.logprobs else (req.logprobs if kind == "text" else None)
    )
    adapter = state.adapter_for(req.model)  # checked already: for the replies' model field
    formats: list[Any] = [_Format(state, kind, logprobs, req.return_token_ids, adapter) for _ in makers]
    if plan is not None and plan.parse:  # tool calls read out of each choice's reply
        formats = [ToolCallFormat(fmt, plan) for fmt in formats]
    return await choices.respond(
        request, group, formats, kind=kind, stream=req.stream, include_usage=include_usage, per_prompt=n
    )


async def completions(request: Request) -> Response:
    """``POST /v1/completions``: one prompt, or a list (one choice per prompt, in order)."""
    state = server_state(request)
    req = parse_body(CompletionRequest, await read_body(request, state.settings.max_body_bytes))
    adapter = state.adapter_for(req.model)
    prompts = completion_prompts(req, state.settings.max_concurrency)
    options = {**openai_options(req, state.default_max_tokens), "adapter": adapter}
    check_options(options, OPENAI_PARAMS, state.info.vocab_size)
    await check_constraint(state.engine, options, "grammar")
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    n = choices.check_n(req.n, state.settings.max_n)
    if n > 1:  # choices prompt by prompt: prompt i's are i*n ... i*n + n - 1, as OpenAI orders them
        opts = choices.choice_options(options, n)
        makers = [lambda sink, p=p, o=o: state.engine.stream(p, sink=sink, **o) for p in prompts for o in opts]
        return await _respond_choices(request, state, "text", makers, n, req, include_usage)
    if len(prompts) > 1:
        return await _complete_batch(request, state, prompts, options, req.return_token_ids)
    prompt = prompts[0]
    job = track(request, await start_job(state, lambda sink: state.engine.stream(prompt, sink=sink, **options)))
    fmt = _Format(state, "text", options.get("logprobs"), req.return_token_ids, adapter)
    return await _respond(request, job, fmt, req.stream, include_usage)


async def _complete_batch(
    request: Request, state: ServerState, prompts: list[Any], options: dict[str, Any], token_ids: bool
) -> Response:
    """Every prompt is its own request to the scheduler (they decode together); the answer has
    their choices in order, usage summed, and each choice's metrics under ``metrics``."""
    jobs: list[Job] = []
    try:
        for prompt in prompts:
            jobs.append(await start_job(state, lambda sink, p=prompt: state.engine.stream(p, sink=sink, **options)))
            track(request, jobs[-1])
        replies = []
        for job in jobs:  # one after the other: they run together in the scheduler meanwhile
            tokens = await collect(job, request)
            if tokens is None:
                return Response(status_code=CLIENT_GONE)
            replies.append((tokens, job))
    finally:
        for job in jobs:
            job.cancel()  # a no-op for finished ones; stops the rest after an error or a disconnect
    first = _Format(state, "text", options.get("logprobs"), token_ids, options.get("adapter"))
    choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    for index, (tokens, job) in enumerate(replies):
        fmt = _Format(state, "text", options.get("logprobs"), token_ids)  # text offsets count per prompt
        reply = fmt.completion(tokens, job.stream)
        choices.append({**reply["choices"][0], "index": index, "metrics": reply["metrics"]})
        for key in usage:
            usage[key] += reply["usage"][key]
    return JSONResponse({**first._envelope("text_completion", choices), "usage": usage})


def model_card(state: ServerState) -> dict[str, Any]:
    """The ``/v1/models`` entry of the served model (with lmx's model info under ``lmx``)."""
    return {
        "id": state.model_id,
        "object": "model",
        "created": state.created,
        "owned_by": "lmx",
        "lmx": state.info.as_dict(),
    }


def adapter_card(state: ServerState, name: str) -> dict[str, Any]:
    """The ``/v1/models`` entry of a LoRA adapter served on the model (``parent``: the model's id)."""
    return {
        "id": name,
        "object": "model",
        "created": state.created,
        "owned_by": "lmx",
        "root": state.model_id,
        "parent": state.model_id,
    }


async def list_models(request: Request) -> Response:
    """``GET /v1/models``: the model, then the LoRA adapters served on it."""
    state = server_state(request)
    cards = [model_card(state)] + [adapter_card(state, name) for name in state.adapters()]
    return JSONResponse({"object": "list", "data": cards})


async def get_model(request: Request) -> Response:
    """``GET /v1/models/{model}``."""
    state = server_state(request)
    name = request.path_params["model"]
    if name in state.adapters():
        return JSONResponse(adapter_card(state, name))
    state.check_model(name, lookup=True)
    return JSONResponse(model_card(state))


def routes() -> list[Route]:
    return [
        Route("/v1/chat/completions", endpoint(chat_completions), methods=["POST"]),
        Route("/v1/completions", endpoint(completions), methods=["POST"]),
        Route("/v1/models", endpoint(list_models), methods=["GET"]),
        Route("/v1/models/{model:path}", endpoint(get_model), methods=["GET"]),
    ]

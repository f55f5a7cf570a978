"""Ollama-compatible endpoints: ``/api/chat``, ``/api/generate`` (NDJSON streaming by
default, as Ollama does), ``/api/tags`` and ``/api/version``. Errors are Ollama's
``{"error": "<message>"}`` with the same statuses as the OpenAI endpoints."""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import lmx
from lmx.generate.tools import plan_tools
from lmx.server.common import (
    CLIENT_GONE,
    JobStreamingResponse,
    ServerState,
    check_options,
    collect,
    endpoint,
    events_after,
    first_event,
    ndjson,
    read_body,
    server_state,
    start_job,
    track,
)
from lmx.server.errors import error_body
from lmx.server.jobs import Job
from lmx.server.schemas import (
    OLLAMA_PARAMS,
    OllamaChatRequest,
    OllamaGenerateRequest,
    UnsupportedParameterError,
    chat_messages,
    ollama_image_options,
    ollama_options,
    parse_body,
)
from lmx.server.structured import check_constraint, check_tool_constraint
from lmx.server.tool_choice import OllamaToolPiece, engine_tool_options, request_tools


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def _final(stream: Any) -> dict[str, Any]:
    """Ollama's closing statistics (durations in nanoseconds)."""
    m = stream.metrics
    ns = 1_000_000_000
    return {
        "done": True,
        "done_reason": stream.finish_reason or "length",
        "total_duration": int(m.total_time * ns),
        "load_duration": 0,
        "prompt_eval_count": m.prompt_tokens,
        "prompt_eval_duration": int(m.time_to_first_token * ns),
        "eval_count": len(stream.tokens),
        "eval_duration": int(max(m.total_time - m.time_to_first_token, 0.0) * ns),
    }


async def _respond(
    request: Request,
    state: ServerState,
    job: Job,
    stream: bool,
    piece: Callable[[str], dict[str, Any]],
    adapter: str | None = None,
) -> Response:
    head = {"model": adapter or state.model_id}  # the adapter that answered, if one did
    if not stream:
        tokens = await collect(job, request)
        if tokens is None:
            return Response(status_code=CLIENT_GONE)
        return JSONResponse({**head, "created_at": _now(), **piece(job.stream.text), **_final(job.stream)})
    first = await first_event(job, request)
    if first is None:
        return Response(status_code=CLIENT_GONE)

    async def body() -> AsyncIterator[bytes]:
        async for event in events_after(job, first):
            if event.kind == "token":
                assert event.token is not None
                if event.token.text:
                    yield ndjson({**head, "created_at": _now(), **piece(event.token.text), "done": False})
            elif event.kind == "end":
                yield ndjson({**head, "created_at": _now(), **piece(""), **_final(job.stream)})
            else:
                assert event.error is not None
                yield ndjson(error_body(event.error, ollama=True)[1])

    return JobStreamingResponse(body(), job, "application/x-ndjson")


async def chat(request: Request) -> Response:
    """``POST /api/chat``."""
    state = server_state(request)
    req = parse_body(OllamaChatRequest, await read_body(request, state.settings.max_body_bytes))
    adapter = state.adapter_for(req.model)
    messages = chat_messages(req.messages)
    options = {**ollama_options(req, state.default_max_tokens), "adapter": adapter}
    check_options(options, OLLAMA_PARAMS, state.info.vocab_size)
    await check_constraint(state.engine, options, "format")
    unload = state.keep_alive.note(req.keep_alive) == 0
    if not messages:  # Ollama answers an empty chat by loading the model and returning at once
        reply = {"role": "assistant", "content": ""}
        return unload_after(
            JSONResponse(
                {"model": state.model_id, "created_at": _now(), "message": reply, "done": True, "done_reason": "load"}
            ),
            state,
            unload,
        )
    kwargs: dict[str, Any] = {}
    if isinstance(req.think, bool):
        kwargs["enable_thinking"] = req.think
    kwargs = state.template_kwargs(kwargs)
    tools, choice = request_tools(req.tools, None, state.engine)
    plan = plan_tools(state.engine.tokenizer, messages, tools, choice, kwargs.get("chat_template")) if tools else None
    tool_kw = engine_tool_options(tools, choice, plan)
    await check_tool_constraint(state.engine, tool_kw, options)
    tool_kw = {**tool_kw, **ollama_image_options(req)}  # with the image options: stream_chat's keywords
    job = await start_job(
        state,
        lambda sink: state.engine.stream_chat(messages, chat_template_kwargs=kwargs, sink=sink, **tool_kw, **options),
    )
    track(request, job)
    piece: Callable[[str], dict[str, Any]] = lambda text: {"message": {"role": "assistant", "content": text}}  # noqa: E731
    if plan is not None:
        piece = OllamaToolPiece(plan, whole=not req.stream)
    response = await _respond(request, state, job, req.stream, piece, adapter)
    return unload_after(response, state, unload)


async def generate(request: Request) -> Response:
    """``POST /api/generate``: ``raw`` sends the prompt as it is, otherwise it goes through
    the chat template as a user message (after ``system``, if given)."""
    state = server_state(request)
    req = parse_body(OllamaGenerateRequest, await read_body(request, state.settings.max_body_bytes))
    adapter = state.adapter_for(req.model)
    for name in ("template", "context", "suffix"):
        if getattr(req, name):
            raise UnsupportedParameterError(f"{name} is not supported", param=name)
    if req.images and req.raw:
        raise UnsupportedParameterError("images need the chat template: not with raw", param="images")
    options = {**ollama_options(req, state.default_max_tokens), "adapter": adapter}
    check_options(options, OLLAMA_PARAMS, state.info.vocab_size)
    await check_constraint(state.engine, options, "format")
    unload = state.keep_alive.note(req.keep_alive) == 0
    if not req.prompt:  # Ollama's way to load (or, with keep_alive 0, unload) the model
        reason = "unload" if unload else "load"
        body = {"model": state.model_id, "created_at": _now(), "response": "", "done": True, "done_reason": reason}
        return unload_after(JSONResponse(body), state, unload)
    engine = state.engine
    if req.raw:
        prompt = req.prompt

        def make(sink: Any) -> Any:
            return engine.stream(prompt, sink=sink, **options)
    else:
        user = {"role": "user", "content": req.prompt, "images": req.images}
        messages = chat_messages(([{"role": "system", "content": req.system}] if req.system else []) + [user])
        kwargs = state.template_kwargs({"enable_thinking": req.think} if isinstance(req.think, bool) else {})
        image_kw = ollama_image_options(req)

        def make(sink: Any) -> Any:
            return engine.stream_chat(messages, chat_template_kwargs=kwargs, sink=sink, **image_kw, **options)

    job = track(request, await start_job(state, make))
    response = await _respond(request, state, job, req.stream, lambda text: {"response": text}, adapter)
    return unload_after(response, state, unload)


def unload_after(response: Response, state: ServerState, unload: bool) -> Response:
    """With ``keep_alive`` 0, clear the engine's prefix cache once ``response`` has been sent
    (lmx keeps the model loaded: what "unloading" frees is the cached prompts' memory)."""
    if unload:
        response.background = BackgroundTask(state.engine.clear_prefix_cache)
    return response


def _size_label(n: int) -> str:
    for unit, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def model_details(info: lmx.ModelInfo) -> dict[str, Any]:
    """Ollama's ``details`` of the served model (format, family, parameter size, quantization)."""
    return {
        "parent_model": "",
        "format": "gguf" if info.source.endswith(".gguf") else "safetensors",
        "family": info.model_type,
        "families": [info.model_type],
        "parameter_size": _size_label(info.num_parameters),
        "quantization_level": _quantization_level(info, info.quantization or {}),
    }


async def tags(request: Request) -> Response:
    """``GET /api/tags``: the one served model, described as Ollama does."""
    state = server_state(request)
    info = state.info
    details = model_details(info)
    modified = datetime.datetime.fromtimestamp(state.created, datetime.timezone.utc).isoformat()
    model = {
        "name": state.model_id,
        "model": state.model_id,
        "modified_at": modified,
        "size": info.weights_bytes,
        "digest": "",
        "details": details,
    }
    adapters = [
        {**model, "name": n, "model": n, "details": {**details, "parent_model": state.model_id}}
        for n in state.adapters()
    ]
    return JSONResponse({"models": [model, *adapters]})


def _quantization_level(info: lmx.ModelInfo, quant: dict[str, int]) -> str:
    """What runs, in Ollama's words: the GGUF mix when its blocks run as such (``Q4_K_M``)."""
    if info.kernel_types or info.affine_types:  # blocks on the CPU kernels, or as MLX affine layers
        return info.gguf_file_type or "+".join(info.kernel_types or info.affine_types or {})
    if quant.get("bits"):
        return f"Q{quant['bits']}"
    return info.dtype.upper()


async def version(request: Request) -> Response:
    """``GET /api/version``."""
    return JSONResponse({"version": lmx.__version__})


def routes() -> list[Route]:
    return [
        Route("/api/chat", endpoint(chat, ollama=True), methods=["POST"]),
        Route("/api/generate", endpoint(generate, ollama=True), methods=["POST"]),
        Route("/api/tags", endpoint(tags, ollama=True), methods=["GET"]),
        Route("/api/version", endpoint(version, ollama=True), methods=["GET"]),
    ]

"""What every route needs: the server's state, the request body, the model check, and
waiting on a job while watching for the client going away."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from lmx.generate.options import GenerationOptions
from lmx.results import ModelInfo, Token
from lmx.server.errors import (
    ApiRequestError,
    BodyTooLargeError,
    ClientDisconnectedError,
    UnknownModelError,
    error_body,
)
from lmx.server.jobs import Event, Job, LoopSink, submit
from lmx.server.keep_alive import KeepAlive
from lmx.server.protocol import CUT_OFF, RefusalLog
from lmx.server.settings import ServerSettings
from lmx.tokenizer import Tokenizer


@dataclass
class ServerState:
    """The objects one app serves with (kept on ``app.state.lmx``; nothing is global)."""

    settings: ServerSettings
    engine: Any
    info: ModelInfo
    model_id: str
    owns_engine: bool
    created: int = field(default_factory=lambda: int(time.time()))
    refusals: RefusalLog = field(default_factory=RefusalLog)
    keep_alive: KeepAlive = field(default_factory=KeepAlive)  # Ollama's, as /api/ps reports it

    @property
    def image_dir(self) -> Path | None:
        """Where ``image_url`` parts may name local files (``--allow-local-images``), or None."""
        d = self.settings.allow_local_images
        return Path(d) if d is not None else None

    @property
    def default_max_tokens(self) -> int:
        context = int(self.engine.context_length)
        return min(self.settings.max_tokens_default or context, context)

    def template_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``kwargs`` plus the server's chat template limits, when the engine renders templates
        here (a remote engine's own server applies its limits)."""
        if isinstance(getattr(self.engine, "tokenizer", None), Tokenizer):
            return {**kwargs, "template_limits": self.settings.template_limits}
        return kwargs

    def check_model(self, name: str, param: str = "model", *, lookup: bool = False) -> None:
        """Raise :class:`UnknownModelError` unless ``name`` is the served model (Ollama's
        ``name:latest`` form included).

        A request that runs the model accepts any name unless ``strict_model_names`` is set: one
        model is served, so the name picks nothing (llama.cpp does the same; clients such as
        LangChain send ``gpt-3.5-turbo`` by default). A ``lookup`` (``GET /v1/models/{id}``)
        always answers 404 for a name that ``/v1/models`` does not list.
        """
        if not lookup and not self.settings.strict_model_names:
            return
        names = {self.model_id, f"{self.model_id}:latest", self.info.name}
        if name not in names:
            raise UnknownModelError(f"model {name!r} is not served here; available: {self.model_id!r}", param=param)

    def adapters(self) -> list[str]:
        """The names of the LoRA adapters served beside the model (``lmx serve --adapter``)."""
        names = getattr(self.engine, "adapters", None)  # a remote engine serves none
        return list(names()) if callable(names) else []

    def adapter_for(self, name: str, param: str = "model") -> str | None:
        """The adapter a request's ``model`` picks: an adapter's name (Ollama's ``name:latest``
        too) picks it, the served model's name picks none (the base model).

        Raises:
            UnknownModelError: adapters are served and ``name`` is none of them nor the base
                model (the served names are listed); with no adapters, as :meth:`check_model`.
        """
        adapters = self.adapters()
        if not adapters:
            self.check_model(name, param)
            return None
        for candidate in (name, name.removesuffix(":latest")):
            if candidate in adapters:
                return candidate
        if name in {self.model_id, f"{self.model_id}:latest", self.info.name}:
            return None
        served = ", ".join(repr(n) for n in [self.model_id, *adapters])
        raise UnknownModelError(
            f"model {name!r} is not served here; served: {served} (the first is the base model, the others "
            "its LoRA adapters)",
            param=param,
        )


def load_served_adapters(engine: Any, specs: tuple[str, ...], model_id: str) -> None:
    """Load the adapters ``lmx serve --adapter`` names (``NAME=PATH`` or ``PATH``) onto ``engine``;
    one the engine holds already under that name, from the same directory, stays as it is.

    Raises:
        InvalidOptionError: a name is the served model's, or names another directory already loaded.
        the errors of :meth:`lmx.Engine.load_adapter` (missing files, an adapter for another model).
    """
    from pathlib import Path

    from lmx.errors import InvalidOptionError
    from lmx.server.settings import parse_adapter

    for spec in specs:
        name, path = parse_adapter(spec)
        if name == model_id:
            raise InvalidOptionError(f"adapter name {name!r} is the served model's name; give the adapter another")
        if name in engine.adapters():
            if Path(engine.adapter_path(name)).resolve() != Path(path).resolve():
                raise InvalidOptionError(
                    f"adapter {name!r} is loaded already from {engine.adapter_path(name)}, not {path}"
                )
            continue
        engine.load_adapter(path, name=name)


def server_state(request: Request) -> ServerState:
    return request.app.state.lmx


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused past ``limit`` bytes (declared or actually sent).

    Raises:
        BodyTooLargeError: the body is larger than ``limit``.
        ClientDisconnectedError: the client went away (or was cut off by ``body_timeout``)
            before sending the whole body.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLargeError(f"request body of {int(declared)} bytes is larger than the limit of {limit} bytes")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLargeError(f"request body is larger than the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        if not request.scope.get(CUT_OFF):  # the server cut it off: counted there already
            server_state(request).refusals.note("client_gone_mid_body")
        raise ClientDisconnectedError(f"the client disconnected after {size} bytes of the request body") from None
    return b"".join(chunks)


def check_options(options: dict[str, Any], params: dict[str, str], vocab_size: int) -> None:
    """Validate engine options, naming the request field at fault.

    Raises:
        ApiRequestError: an option is out of range; ``param`` is the request field it came from.
    """
    from lmx.errors import InvalidOptionError

    try:
        GenerationOptions.from_kwargs(**options).validate(vocab_size)
    except InvalidOptionError as e:
        param = None
        for name, value in options.items():
            try:
                GenerationOptions.from_kwargs(**{name: value}).validate(vocab_size)
            except InvalidOptionError:
                param = params.get(name, name)
                break
        raise ApiRequestError(str(e), param=param) from None


async def start_job(state: ServerState, make_stream: Callable[[LoopSink], Any]) -> Job:
    """Build the token stream with a sink on this event loop (tokenizing off the loop); making
    it submits the request to the engine's scheduler.

    Raises:
        whatever ``make_stream`` raises (bad options, context length...), QueueFullError,
        OutOfMemoryError.
    """
    loop = asyncio.get_running_loop()
    return await run_in_threadpool(submit, make_stream, loop)


JOBS_KEY = "lmx.jobs"  # the scope entry where RequestLog collects a request's jobs (for its token count)


def track(request: Request, job: Job) -> Job:
    """Note ``job`` under the request, so that its access-log line counts its tokens."""
    jobs = request.scope.get(JOBS_KEY)
    if isinstance(jobs, list):
        jobs.append(job)
    return job


async def _disconnected(request: Request) -> None:
    """Return when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def wait_event(job: Job, request: Request) -> Event | None:
    """The job's next event, or None (and the job cancelled) if the client left first."""
    gone = asyncio.ensure_future(_disconnected(request))
    nxt = asyncio.ensure_future(job.next_event())
    try:
        done, _ = await asyncio.wait({gone, nxt}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (gone, nxt):
            if not task.done():
                task.cancel()
    if nxt in done:
        return nxt.result()
    job.cancel()
    return None


async def collect(job: Job, request: Request) -> list[Token] | None:
    """Every token of a job, or None if the client left first.

    Raises:
        the error the job ended with.
    """
    tokens: list[Token] = []
    while True:
        event = await wait_event(job, request)
        if event is None:
            return None
        if event.kind == "error":
            assert event.error is not None
            raise event.error
        if event.kind == "end":
            return tokens
        assert event.token is not None
        tokens.append(event.token)


async def first_event(job: Job, request: Request) -> Event | None:
    """The job's first event, waited for before a streaming response starts, so an error at
    the start is answered with its own status; None if the client left first.

    Raises:
        the error the job started with.
    """
    first = await wait_event(job, request)
    if first is not None and first.kind == "error":
        assert first.error is not None
        raise first.error
    return first


async def events_after(job: Job, first: Event) -> AsyncIterator[Event]:
    """``first`` and the job's later events up to its end; the job is cancelled if the
    consumer stops early (the response task is cancelled when the client disconnects)."""
    try:
        event = first
        while True:
            yield event
            if event.kind != "token":
                return
            event = await job.next_event()
    finally:
        job.cancel()


def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


# Characters Python's str.splitlines() ends a line at that JSON leaves raw (it escapes those below 0x20): a
# client that reads a stream with it (httpx's iter_lines, so the ollama and many hand-written clients) would
# cut an event in two where a model wrote one of them.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def one_line_json(data: Any) -> str:
    """``data`` as compact JSON (non-ASCII text kept) on one line for any line splitter."""
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).translate(_LINE_BREAKS)


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event."""
    text = data if isinstance(data, str) else one_line_json(data)
    return f"data: {text}\n\n".encode()


def ndjson(data: dict[str, Any]) -> bytes:
    return (one_line_json(data) + "\n").encode()


class JobStreamingResponse(StreamingResponse):
    """A streaming response that cancels its job however it ends (finished, failed, or the
    client disconnected), so the engine never generates for nobody."""

    def __init__(self, content: AsyncIterator[bytes], job: Job, media_type: str) -> None:
        super().__init__(
            content, media_type=media_type, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self.job = job

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


def error_response(exc: BaseException, *, ollama: bool = False) -> JSONResponse:
    """The JSON error answering ``exc`` (status from its type; 503s say when to retry)."""
    status, body = error_body(exc, ollama=ollama)
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse(body, status_code=status, headers=headers)


def endpoint(
    handler: Callable[[Request], Awaitable[Response]], *, ollama: bool = False
) -> Callable[[Request], Awaitable[Response]]:
    """Wrap a route so any error it raises is answered in the API's error shape."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except Exception as e:
            return error_response(e, ollama=ollama)

    wrapped.__name__ = handler.__name__
    wrapped.__doc__ = handler.__doc__
    return wrapped


CLIENT_GONE = 499  # nginx's "client closed request": logged only, nobody reads it

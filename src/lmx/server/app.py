"""The app factory: ``create_app(settings, engine=None)`` builds a Starlette app serving the
OpenAI and Ollama APIs and the Lab chat page; :func:`serve` runs it with uvicorn."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import errno
import functools
import hmac
import logging
import time
from collections.abc import AsyncIterator, Collection
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmx.server import (
    routes_anthropic,
    routes_classify,
    routes_embeddings,
    routes_ollama,
    routes_ollama_models,
    routes_openai,
)
from lmx.server.common import JOBS_KEY, ServerState, error_response, load_served_adapters, server_state
from lmx.server.errors import AuthenticationError, MethodNotAllowedError, RouteNotFoundError
from lmx.server.metrics import MetricsMiddleware, ServerMetrics, metrics_endpoint
from lmx.server.protocol import ConnectionLimits, LimitedProtocol, RefusalLog
from lmx.server.settings import ServerSettings

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
OPEN_PATHS = frozenset({"/health"})
ACCEPT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
FD_RESERVE = 64  # descriptors the process needs besides connections (model files, logs, pipes)
UVICORN_BACKLOG = 2048  # uvicorn's default listen backlog (asyncio also accepts this many per wake-up)
PAGE_PATHS = ("/", "/static/")  # the Lab page and its files: open, the page asks for the key itself


access_logger = logging.getLogger("lmx.server.access")


class RequestLog:
    """One INFO line per HTTP request on ``lmx.server.access``: method, path, status, generated
    tokens, their rate over the request's wall time, and that time in ms (``lmx serve
    --log-level info``, the default, shows them; uvicorn's own access log stays off)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not access_logger.isEnabledFor(logging.INFO):
            await self.app(scope, receive, send)
            return
        start, status, jobs = time.perf_counter(), 0, []
        scope[JOBS_KEY] = jobs

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            elapsed = time.perf_counter() - start
            tokens = sum(len(job.stream.tokens) for job in jobs)
            access_logger.info(
                "%s %s %s %d tokens %.1f tok/s %.0f ms",
                scope["method"],
                scope["path"],
                status or "-",  # none sent: the client left first
                tokens,
                tokens / elapsed if elapsed > 0 else 0.0,
                elapsed * 1000,
            )


class ApiKeyMiddleware:
    """Require the API key on every route but ``/health`` and ``open_paths``, compared in constant time.

    Accepted: ``Authorization: Bearer <key>`` or ``x-api-key: <key>`` (API clients; Anthropic
    SDKs send the latter; the Lab page asks for the key and keeps it in sessionStorage) or HTTP
    Basic auth with the key as the password. A path is open when it equals an entry of
    ``open_paths``, or an entry ends with "/" and the path starts with it; the root "/" opens
    only itself (as a prefix it would open every path). A 401 always carries
    ``WWW-Authenticate: Bearer``.
    """

    def __init__(self, app: ASGIApp, api_key: str, open_paths: Collection[str] = ()) -> None:
        self.app = app
        self._key = api_key.encode()
        self._open = frozenset(OPEN_PATHS | set(open_paths))
        self._open_prefixes = tuple(p for p in self._open if p.endswith("/") and p != "/")

    def _is_open(self, path: str) -> bool:
        return path in self._open or path.startswith(self._open_prefixes)

    def _authorized(self, scope: Scope) -> bool:
        header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, value = header.partition(b" ")
        candidate = b""
        if scheme.lower() == b"bearer":
            candidate = value.strip()
        elif scheme.lower() == b"basic":
            try:
                candidate = base64.b64decode(value.strip(), validate=True).partition(b":")[2]
            except (binascii.Error, ValueError):
                candidate = b""
        x_api_key = next((v for k, v in scope["headers"] if k == b"x-api-key"), b"").strip()
        return hmac.compare_digest(candidate, self._key) | hmac.compare_digest(x_api_key, self._key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._is_open(scope["path"]) or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        has_key = any(k in (b"authorization", b"x-api-key") for k, _ in scope["headers"])
        message = "invalid API key" if has_key else "missing API key: send 'Authorization: Bearer <key>'"
        response = error_response(AuthenticationError(message), ollama=path.startswith("/api/"))
        if routes_anthropic.is_anthropic_path(path):
            message = "invalid API key" if has_key else "missing API key: send 'x-api-key: <key>'"
            response = routes_anthropic.anthropic_error_response(AuthenticationError(message))
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)


async def health(request: Request) -> Response:
    """``GET /health``: liveness and load; never needs the key."""
    state = server_state(request)
    stats = state.engine.stats()
    return JSONResponse(
        {
            "status": "ok",
            "model": state.model_id,
            "queue": {
                "running": stats.running,
                "waiting": stats.waiting,
                "max_queue": state.settings.max_queue,
                "max_concurrency": state.settings.max_concurrency,
            },
            "requests": {
                "completed": stats.completed,
                "cancelled": stats.cancelled,
                "failed": stats.failed,
                "rejected": stats.rejected,
                "batches": stats.batched_steps,
            },
            "refused_connections": dict(state.refusals.totals),
        }
    )


async def lab_page(request: Request) -> Response:
    """``GET /``: the Lab chat page."""
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def _not_found(request: Request, exc: Exception) -> Response:
    path = request.url.path
    if isinstance(exc, HTTPException) and exc.status_code == 405:
        error: Exception = MethodNotAllowedError(f"method {request.method} is not allowed on {path}")
    else:
        error = RouteNotFoundError(f"no route {request.method} {path}")
    if routes_anthropic.is_anthropic_path(path):
        return routes_anthropic.anthropic_error_response(error)
    return error_response(error, ollama=path.startswith("/api/"))


def _warm_up(engine: Any) -> None:
    """Generate one token before serving, so the first request is not slowed by one-time
    setup on the scheduler's worker (its first graphs, compiled steps, the allocator), sampling
    and penalties included (on a CUDA GPU their kernels are compiled at first use)."""
    engine.generate([0], max_tokens=2)
    engine.generate([0], max_tokens=2, temperature=0.7, top_p=0.9, top_k=40, min_p=0.01, frequency_penalty=0.1, seed=0)


def create_app(settings: ServerSettings | None = None, engine: Any = None) -> Starlette:
    """Build the server app.

    Args:
        settings: how to serve; default :class:`ServerSettings()`.
        engine: an already-loaded :class:`lmx.Engine` to serve (the app leaves it open when
            it shuts down); None loads ``settings.model`` (and closes it at shutdown).

    Returns:
        A Starlette (ASGI) app; its state is on ``app.state.lmx`` (a :class:`ServerState`).

    Raises:
        the errors of :func:`lmx.load` when it loads the model.
    """
    import lmx

    settings = settings or ServerSettings()
    owns = engine is None
    if engine is None:
        engine = lmx.load(
            settings.model,
            device=settings.device,
            dtype=settings.dtype,
            draft_model=settings.draft_model,
            speculative=settings.speculative,
            kv_bits=settings.kv_bits,
            kv_group_size=settings.kv_group_size,
        )
    elif settings.speculative is not None:  # the server's default for requests that give none
        engine.default_options = engine.options({"speculative": settings.speculative})
    # The server's limits are the scheduler's: rows decoded together, requests waiting.
    engine.scheduler.config.max_batch = settings.max_concurrency
    engine.scheduler.config.max_queue = settings.max_queue
    info = engine.info()
    model_id = settings.model_name or info.name
    try:
        load_served_adapters(engine, settings.adapters, model_id)
    except BaseException:
        if owns:
            engine.close()
        raise
    if settings.warm_up:
        _warm_up(engine)
    state = ServerState(settings=settings, engine=engine, info=info, model_id=model_id, owns_engine=owns)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        _count_accept_failures(asyncio.get_running_loop(), state.refusals)
        try:
            yield
        finally:
            state.refusals.flush()
            if owns:
                engine.close()

    routes: list[Any] = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
    ]
    routes += routes_openai.routes() + routes_classify.routes() + routes_ollama.routes()
    routes += routes_embeddings.routes() + routes_ollama_models.routes() + routes_anthropic.routes()
    if settings.lab:
        routes += [
            Route("/", lab_page, methods=["GET"]),
            Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
        ]
    metrics = ServerMetrics(engine)
    # outermost: 401s and CORS preflights are logged and counted too
    middleware = [Middleware(RequestLog), Middleware(MetricsMiddleware, metrics=metrics, routes=routes)]
    if settings.cors_origins:  # outside the key check, so preflight requests and 401s carry CORS headers
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.cors_origins),
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["Authorization", "Content-Type", *routes_anthropic.CORS_HEADERS],
                max_age=600,
            )
        )
    if settings.api_key:
        open_paths = (PAGE_PATHS if settings.lab else ()) + (("/metrics",) if settings.public_metrics else ())
        middleware.append(Middleware(ApiKeyMiddleware, api_key=settings.api_key, open_paths=open_paths))
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={404: _not_found, 405: _not_found},
        lifespan=lifespan,
    )
    app.state.lmx = state
    app.state.metrics = metrics
    return app


def _count_accept_failures(loop: asyncio.AbstractEventLoop, refusals: RefusalLog) -> None:
    """Count the event loop's "accept() out of file descriptors" reports as refusals (one log
    line per interval) instead of a traceback each; other reports go where they went before."""
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if "socket" in context and isinstance(exc, OSError) and exc.errno in ACCEPT_ERRNOS:
            refusals.note("accept_failed")  # asyncio pauses accepting for a second and retries
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


def _ensure_fd_room(settings: ServerSettings, backlog: int) -> None:
    """Raise this process's soft file-descriptor limit (up to its hard limit) so that a flood of
    connections is refused by ``max_connections`` before ``accept()`` runs out of descriptors:
    asyncio accepts up to ``backlog`` sockets at a time before any of them is counted, and
    evicted or refused ones linger briefly."""
    try:
        import resource
    except ImportError:  # not a Unix: no limit to raise
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * settings.max_connections + backlog + FD_RESERVE
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    target = need if hard == resource.RLIM_INFINITY else min(hard, need)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            logger.debug("could not raise the file-descriptor limit to %d: %s", target, e)
    if soft < need:
        logger.warning(
            "this process may open only %d files (ulimit -n; hard limit %s): a flood of connections can run "
            "it out before max_connections=%d refuses them; raise the limit to %d or lower max_connections",
            soft,
            hard,
            settings.max_connections,
            need,
        )


def uvicorn_config(app: Starlette, settings: ServerSettings, **overrides: Any) -> Any:
    """The uvicorn configuration serving ``app`` as ``settings`` say (head and body timeouts,
    connection cap, graceful-shutdown limit, no access log unless asked)."""
    import uvicorn

    state = getattr(app.state, "lmx", None)
    refusals = state.refusals if state is not None else RefusalLog()
    limits = ConnectionLimits(settings.body_timeout, settings.max_connections, refusals)
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "http": functools.partial(LimitedProtocol, limits=limits),
        "timeout_keep_alive": settings.keep_alive_timeout,
        "timeout_graceful_shutdown": 5,
        "access_log": False,
        "log_level": "warning",
        "lifespan": "on",
    }
    options.update(overrides)
    _ensure_fd_room(settings, int(options.get("backlog", UVICORN_BACKLOG)))
    return uvicorn.Config(app, **options)


def serve(settings: ServerSettings, engine: Any = None, **uvicorn_overrides: Any) -> None:
    """Load the model (unless given) and serve until interrupted.

    Args:
        settings: how to serve.
        engine: an already-loaded engine, or None to load ``settings.model``.
        **uvicorn_overrides: extra :class:`uvicorn.Config` arguments (``log_level``...).
    """
    import uvicorn

    if not settings.is_loopback:
        logger.warning("serving on %s: other machines can reach this server", settings.host)
        if not settings.api_key:
            logger.warning("no API key set: anyone who can reach %s:%d can use the model", settings.host, settings.port)
    app = create_app(settings, engine)
    uvicorn.Server(uvicorn_config(app, settings, **uvicorn_overrides)).run()

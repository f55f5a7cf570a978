"""Prometheus metrics of one server: ``GET /metrics`` in Prometheus' text format.

Every app has its own :class:`prometheus_client.CollectorRegistry` (nothing is registered in
the process-wide default registry), so two apps in one process count apart.

What is exported:

- ``lmx_requests_total{route, status}``: HTTP requests answered, by route template
  (``/v1/chat/completions``; ``other`` for a path no route serves) and status code.
- ``lmx_prompt_tokens_total``, ``lmx_cached_prompt_tokens_total`` (prompt tokens taken from
  the prefix cache instead of being prefilled), ``lmx_generated_tokens_total``.
- ``lmx_time_to_first_token_seconds`` and ``lmx_inter_token_latency_seconds`` histograms (from
  a request's arrival at the scheduler to its first token; between two of its tokens).
- Gauges read from :meth:`lmx.Engine.stats` at each scrape: ``lmx_queue_depth`` (requests
  waiting), ``lmx_batch_size`` (requests running), ``lmx_kv_cache_bytes`` (keys and values of the
  running batch), ``lmx_prefix_cache_bytes``, ``lmx_prefix_cache_hit_ratio`` (lookups that found
  a cached prefix, over all lookups).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmx.server.common import JOBS_KEY

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _EngineCollector(Collector):
    """Gauges of the engine's load, read from its public stats when scraped."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self.engine.stats()
        prefix = stats.prefix
        ratio = prefix.hits / prefix.lookups if prefix.lookups else 0.0
        yield GaugeMetricFamily("lmx_queue_depth", "Requests waiting to start.", value=stats.waiting)
        yield GaugeMetricFamily("lmx_batch_size", "Requests running (rows of the decode batch).", value=stats.running)
        yield GaugeMetricFamily("lmx_kv_cache_bytes", "Bytes of keys and values of the running batch.", stats.kv_bytes)
        yield GaugeMetricFamily("lmx_prefix_cache_bytes", "Bytes held by the prefix cache.", value=prefix.bytes)
        yield GaugeMetricFamily(
            "lmx_prefix_cache_hit_ratio", "Prefix-cache lookups that found a cached prefix, over all lookups.", ratio
        )


class ServerMetrics:
    """The metrics of one app, in a registry of their own.

    Args:
        engine: the served engine (its ``stats()`` feed the gauges).
    """

    def __init__(self, engine: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("lmx_requests", "HTTP requests answered.", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("lmx_prompt_tokens", "Prompt tokens of generation requests.", registry=r)
        self.cached_tokens = Counter(
            "lmx_cached_prompt_tokens", "Prompt tokens taken from the prefix cache (not prefilled).", registry=r
        )
        self.generated_tokens = Counter("lmx_generated_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram(
            "lmx_time_to_first_token_seconds",
            "Seconds from a request's arrival to its first token.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "lmx_inter_token_latency_seconds",
            "Seconds between two tokens of a request.",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        r.register(_EngineCollector(engine))

    def observe_job(self, job: Any) -> None:
        """Count one generation request's tokens and latencies once it has ended (or been left)."""
        stream = job.stream
        m = stream.metrics
        self.prompt_tokens.inc(m.prompt_tokens)
        self.cached_tokens.inc(m.cached_tokens)
        times = job.token_times
        self.generated_tokens.inc(len(times))
        if times:
            self.ttft.observe(max(times[0] - stream.request.submitted, 0.0))
        for a, b in itertools.pairwise(times):
            self.itl.observe(b - a)

    def render(self) -> bytes:
        """The registry in Prometheus' text exposition format."""
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts every HTTP request by route and status, and the tokens of the jobs it ran.

    Args:
        app: the app inside.
        metrics: where to count.
        routes: the app's routes (a request is labelled with the template of the one it matches).
    """

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, routes: Sequence[BaseRoute]) -> None:
        self.app, self.metrics, self.routes = app, metrics, list(routes)

    def _route(self, scope: Scope) -> str:
        for route in self.routes:
            match, _ = route.matches(scope)
            if match != Match.NONE:
                return str(getattr(route, "path", "other"))
        return "other"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        jobs = scope.setdefault(JOBS_KEY, [])
        status = 0

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(route=self._route(scope), status=str(status or 499)).inc()
            for job in jobs if isinstance(jobs, list) else ():
                self.metrics.observe_job(job)


async def metrics_endpoint(request: Request) -> Response:
    """``GET /metrics``: the server's Prometheus metrics."""
    metrics: ServerMetrics = request.app.state.metrics
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST, headers={"Cache-Control": "no-cache"})


__all__ = ["MetricsMiddleware", "ServerMetrics", "metrics_endpoint"]

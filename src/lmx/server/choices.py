"""OpenAI's ``n > 1``: several choices for one request, as rows of the same batch.

Each choice is its own request to the engine's scheduler, submitted together, so they are
prefilled and decoded side by side. With a ``seed``, choice ``i`` samples with seed ``seed + i``
(so choice 0 is what the request gives with ``n`` = 1, and the whole answer is reproducible);
without one, each choice draws its own random keys. Streaming chunks carry their choice's
``index``; usage counts the prompt once (per prompt) and sums the completion tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lmx.server.common import (
    CLIENT_GONE,
    JobStreamingResponse,
    ServerState,
    collect,
    events_after,
    first_event,
    sse,
    start_job,
    track,
)
from lmx.server.errors import ApiRequestError, error_body
from lmx.server.jobs import Event, Job

SEED_MODULUS = 2**64  # seeds are uint64: seed + i wraps around


def check_n(n: int | None, max_n: int) -> int:
    """The number of choices a request asks for.

    Raises:
        ApiRequestError: ``n`` < 1 or above the server's ``max_n`` (both named).
    """
    if n is None:
        return 1
    if n < 1 or n > max_n:
        raise ApiRequestError(f"n must be in [1, {max_n}] (the server's max_n), got {n}", param="n")
    return n


def choice_options(options: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """The options of each of ``n`` choices: with a seed, choice ``i`` gets ``seed + i``."""
    seed = options.get("seed")
    if seed is None:
        return [dict(options) for _ in range(n)]
    return [{**options, "seed": (seed + i) % SEED_MODULUS} for i in range(n)]


class JobGroup:
    """The jobs of one request's choices, cancelled together."""

    def __init__(self, jobs: Sequence[Job]) -> None:
        self.jobs = list(jobs)

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()


async def start_jobs(request: Request, state: ServerState, makers: Sequence[Callable[[Any], Any]]) -> JobGroup:
    """Submit every choice's request (cancelling those already submitted if one fails)."""
    group = JobGroup([])
    try:
        for make in makers:
            group.jobs.append(track(request, await start_job(state, make)))
    except BaseException:
        group.cancel()
        raise
    return group


async def respond(
    request: Request,
    group: JobGroup,
    formats: Sequence[Any],
    *,
    kind: str,
    stream: bool,
    include_usage: bool,
    per_prompt: int,
) -> Response:
    """Answer with every choice: one JSON object, or one SSE stream of indexed chunks.

    Args:
        request: the HTTP request.
        group: one job per choice, in choice order.
        formats: one OpenAI formatter per choice (``chunk``, ``completion``, ``usage``...).
        kind: ``"chat"`` or ``"text"``.
        stream: answer with server-sent events.
        include_usage: end the stream with a usage chunk.
        per_prompt: choices per prompt (``n``): a prompt's tokens are counted once.
    """
    for fmt in formats[1:]:  # one id and timestamp for the whole answer
        fmt.id, fmt.created = formats[0].id, formats[0].created
    if not stream:
        return await _whole(request, group, formats, kind, per_prompt)
    try:
        firsts = [await first_event(job, request) for job in group.jobs]
    except BaseException:
        group.cancel()
        raise
    if any(first is None for first in firsts):
        group.cancel()
        return Response(status_code=CLIENT_GONE)

    async def body() -> AsyncIterator[bytes]:
        async for index, event in _merged(group, firsts):
            if event.kind == "token":
                assert event.token is not None
                chunk = formats[index].chunk(event.token)
                if chunk is not None:
                    chunk["choices"][0]["index"] = index
                    yield sse(chunk)
            elif event.kind == "error":
                assert event.error is not None
                yield sse(error_body(event.error)[1])
                yield sse("[DONE]")
                return
        if include_usage:
            obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
            envelope = formats[0].usage_chunk(group.jobs[0].stream)
            yield sse({**envelope, "object": obj, "usage": _usage(group, formats, per_prompt)})
        yield sse("[DONE]")

    return JobStreamingResponse(body(), group, "text/event-stream")  # type: ignore[arg-type]


def _usage(group: JobGroup, formats: Sequence[Any], per_prompt: int) -> dict[str, Any]:
    usages = [fmt.usage(job.stream) for fmt, job in zip(formats, group.jobs)]
    prompt = sum(u["prompt_tokens"] for i, u in enumerate(usages) if i % per_prompt == 0)
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for i, u in enumerate(usages) if i % per_prompt == 0)
    completion = sum(u["completion_tokens"] for u in usages)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


async def _whole(request: Request, group: JobGroup, formats: Sequence[Any], kind: str, per_prompt: int) -> Response:
    replies = []
    try:
        for fmt, job in zip(formats, group.jobs):  # one after the other: they run together meanwhile
            tokens = await collect(job, request)
            if tokens is None:
                return Response(status_code=CLIENT_GONE)
            replies.append(fmt.completion(tokens, job.stream))
    finally:
        group.cancel()  # a no-op for finished ones; stops the rest after an error or a disconnect
    choices = [{**r["choices"][0], "index": i, "metrics": r["metrics"]} for i, r in enumerate(replies)]
    head = {key: replies[0][key] for key in ("id", "object", "created", "model")}
    return JSONResponse({**head, "choices": choices, "usage": _usage(group, formats, per_prompt)})


async def _merged(group: JobGroup, firsts: list[Event | None]) -> AsyncIterator[tuple[int, Event]]:
    """Every job's events (from its first) as they come, tagged with the job's index."""
    queue: asyncio.Queue[tuple[int, Event | None]] = asyncio.Queue()

    async def pump(index: int, job: Job, first: Event) -> None:
        async for event in events_after(job, first):
            await queue.put((index, event))
        await queue.put((index, None))

    tasks = [
        asyncio.ensure_future(pump(i, job, first))
        for i, (job, first) in enumerate(zip(group.jobs, firsts))
        if first is not None
    ]
    live = len(tasks)
    try:
        while live:
            index, event = await queue.get()
            if event is None:
                live -= 1
                continue
            yield index, event
    finally:
        for task in tasks:
            task.cancel()
        group.cancel()


__all__ = ["JobGroup", "check_n", "choice_options", "respond", "start_jobs"]

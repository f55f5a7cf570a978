"""Requests of the server as jobs: the engine's scheduler makes their tokens on its worker
thread; a job hands them to the event loop that answers the client.

The server has no scheduler of its own: every route submits to the engine's
(:mod:`lmx.scheduler`), which batches all running requests continuously, and a job only moves
tokens across threads (:class:`LoopSink`) and records them on the request's
:class:`lmx.engine.TokenStream` as the response reads them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from lmx.results import Token

EventKind = Literal["token", "end", "error"]


@dataclass(frozen=True)
class Event:
    """What a job reports to the request handler: a token, its end, or the error that ended it."""

    kind: EventKind
    token: Token | None = None
    error: BaseException | None = None


class LoopSink:
    """A scheduler sink that posts a request's tokens to an asyncio event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.closed = False
        self.times: list[float] = []  # perf_counter() of each token, on the scheduler's worker (metrics)

    def _post(self, event: Event) -> None:
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.closed = True

    def token(self, token: Token) -> None:
        self.times.append(time.perf_counter())
        self._post(Event("token", token=token))

    def end(self, error: BaseException | None) -> None:
        self._post(Event("end") if error is None else Event("error", error=error))


class Job:
    """One request of the server: its :class:`lmx.engine.TokenStream` and its events.

    Args:
        stream: the engine's stream of this request, made with this job's sink.
        sink: where the scheduler posts its tokens.
    """

    def __init__(self, stream: Any, sink: LoopSink) -> None:
        self.stream = stream
        self._sink = sink
        self.generated = 0

    @property
    def token_times(self) -> list[float]:
        """``time.perf_counter()`` when each token was made (for latency metrics)."""
        return self._sink.times

    async def next_event(self) -> Event:
        """The next event (waits for it); tokens are recorded on :attr:`stream`."""
        event = await self._sink.events.get()
        if event.kind == "token":
            assert event.token is not None
            self.generated += 1
            self.stream.record(event.token)
        else:
            self.stream.ended()
        return event

    def cancel(self) -> None:
        """Stop the request (nothing happens if it has ended already)."""
        self.stream.cancel()


def submit(make_stream: Callable[[LoopSink], Any], loop: asyncio.AbstractEventLoop) -> Job:
    """Make the request's stream with a sink on ``loop`` (which submits it) and wrap it in a job."""
    sink = LoopSink(loop)
    return Job(make_stream(sink), sink)


__all__ = ["Event", "Job", "LoopSink", "submit"]

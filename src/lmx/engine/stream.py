"""A request's tokens as an iterator (:class:`TokenStream`), and a finished stream as a :class:`Completion`."""

from __future__ import annotations

from typing import Any, Protocol

from lmx.results import Completion, GenerationMetrics, Token
from lmx.scheduler import QueueSink, Request, Scheduler


class StreamOwner(Protocol):
    """What a stream needs of its engine: the scheduler that runs it, and where the last metrics go."""

    scheduler: Scheduler
    metrics: GenerationMetrics


class TokenStream:
    """An iterator of :class:`Token`; after it ends, ``metrics``, ``finish_reason``, ``text``
    and ``tokens`` describe the whole generation. ``close()`` stops it early (its
    ``finish_reason`` is then ``"cancelled"``).

    The request runs on the engine's scheduler whether or not the stream is read; tokens
    wait for the reader. A stream made with a sink of the caller's (the server's) is not
    iterated: the caller reports the tokens it reads with :meth:`record` and :meth:`ended`.
    """

    def __init__(self, engine: StreamOwner, request: Request, sink: Any) -> None:
        self._engine = engine
        self.request = request
        self._sink = sink
        self.metrics = request.metrics
        self.finish_reason: str | None = None
        self.text = ""
        self.tokens: list[int] = []
        self._ended = False

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> Token:
        if self._ended:
            raise StopIteration
        try:
            token = self._sink.get()
        except BaseException:
            self.ended()
            raise
        if token is None:
            self.ended()
            raise StopIteration
        return self.record(token)

    def record(self, token: Token) -> Token:
        """Add a token read from the request to the stream's text, ids and finish reason."""
        self.text += token.text
        self.tokens.append(token.id)
        if token.finish_reason is not None:
            self.finish_reason = token.finish_reason
        return token

    def ended(self) -> None:
        """The request ended: settle the finish reason and the engine's last metrics."""
        self._ended = True
        if self.finish_reason is None:
            self.finish_reason = self.request.finish_reason or "cancelled"
        self._engine.metrics = self.metrics

    def cancel(self) -> None:
        """Ask the scheduler to stop the request, without waiting for it."""
        if not self._ended:
            self._engine.scheduler.cancel(self.request)

    def close(self) -> None:
        """Stop generating; the request ends as ``cancelled`` unless it had already finished."""
        if self._ended:
            return
        self.cancel()
        if not isinstance(self._sink, QueueSink):
            return
        while not self._ended:  # wait for its end: its metrics are then final
            try:
                next(self)
            except StopIteration:
                break
            except Exception:  # its error is of no interest to a caller who stopped reading
                break
        if self.request.finish_reason in (None, "cancelled"):
            self.finish_reason = "cancelled"

    def __enter__(self) -> TokenStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def collect(stream: TokenStream) -> Completion:
    """Read ``stream`` to its end: the whole generation as a :class:`Completion` (log-probabilities
    of every token, and the top ones where they were asked for)."""
    logprobs: list[float] = []
    tops: list[Any] = []
    want_top = False
    for token in stream:
        logprobs.append(token.logprob)
        tops.append(token.top_logprobs)
        want_top = want_top or token.top_logprobs is not None
    return Completion(
        text=stream.text,
        tokens=stream.tokens,
        finish_reason=stream.finish_reason or "length",  # type: ignore[arg-type]
        metrics=stream.metrics,
        logprobs=logprobs,
        top_logprobs=tops if want_top else None,
    )

"""uvicorn's HTTP/1.1 protocol with the limits a server on the open network needs.

uvicorn closes an idle keep-alive connection only after it has sent a response, never times
out a request body, and accepts as many connections as the process has file descriptors. A
client that trickles its request head or body a byte at a time holds a connection (and a file
descriptor) for as long as it likes; a few thousand of them starve everyone else. Here:

* a connection must deliver a complete request head within ``timeout_keep_alive`` seconds of
  opening and of each response, or it is closed;
* a request body must arrive whole within ``body_timeout`` seconds of its head, or the request
  is answered 408 (if no response went out yet) and the connection closed;
* a connection opened while ``max_connections`` are open makes room by evicting the connection
  that has waited longest for its client (an idle keep-alive one, or one still sending its
  request head or body), which is answered 503 and closed; when every open connection has a
  request running, the new one is answered 503 and closed instead. So clients that trickle
  bytes cannot hold the slots against a client that sends its request at once;
* a connection whose response went out before its body was read (a 401 for a missing key, a
  413) is closed, not kept draining the rest of the body.

Closing is "lingering" (as Apache and nginx do): the answer is written, the sending side shut,
and what the client still sends is read and dropped for :data:`LINGER_SECONDS`, so that closing
with unread data does not reset the connection before the client reads the answer.

Refusals are logged through a :class:`RefusalLog`: one line per kind at most every
``interval`` seconds, with a count, never a traceback each.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from lmx.server.errors import RequestTimeoutError, TooManyConnectionsError, error_body

logger = logging.getLogger(__name__)

CUT_OFF = "lmx.cut_off"  # scope key set when the server, not the client, ended the request
LINGER_SECONDS = 1.0  # how long a closing connection still reads (and drops) what the client sends

REFUSAL_KINDS = {
    "too_many_connections": "answered 503: max_connections were open, each with a request running",
    "evicted": "answered 503 and closed to make room: the longest wait for a client at max_connections",
    "body_timeout": "request body not complete within body_timeout: answered 408 and closed",
    "head_timeout": "request head not complete within keep_alive_timeout: closed",
    "client_gone_mid_body": "the client closed the connection before sending its whole body",
    "accept_failed": "the process ran out of file descriptors: new connections wait (lower max_connections)",
}


@dataclass
class RefusalLog:
    """Counts refused connections by kind and logs one warning line per kind at most every
    ``interval`` seconds (the count since the last line), so a storm of bad clients costs a few
    log lines, not one (or a traceback) each.

    Attributes:
        totals: refusals of each kind since the server started.
    """

    interval: float = 10.0
    clock: Callable[[], float] = time.monotonic
    totals: Counter[str] = field(default_factory=Counter)
    _pending: Counter[str] = field(default_factory=Counter)
    _last: dict[str, float] = field(default_factory=dict)

    def note(self, kind: str) -> None:
        """Count one refusal of ``kind`` (a key of :data:`REFUSAL_KINDS`); log if it is time."""
        self.totals[kind] += 1
        self._pending[kind] += 1
        now = self.clock()
        last = self._last.get(kind)
        if last is None or now - last >= self.interval:
            self._emit(kind, now if last is None else last, now)

    def flush(self) -> None:
        """Log what was counted since each kind's last line (at shutdown)."""
        now = self.clock()
        for kind in [k for k, n in self._pending.items() if n]:
            self._emit(kind, self._last.get(kind, now), now)

    def _emit(self, kind: str, since: float, now: float) -> None:
        n = self._pending.pop(kind)
        window = f" in the last {now - since:.0f} s" if now > since else ""
        logger.warning("refused %d connection(s)%s: %s (%s)", n, window, kind, REFUSAL_KINDS.get(kind, kind))
        self._last[kind] = now


@dataclass(frozen=True)
class ConnectionLimits:
    """What :class:`LimitedProtocol` enforces, shared by every connection of one server."""

    body_timeout: float
    max_connections: int
    refusals: RefusalLog


def raw_error_response(exc: BaseException, *, ollama: bool = False) -> bytes:
    """A complete HTTP/1.1 error response (``Connection: close``) answering ``exc``, for the
    moments no ASGI response can be sent (no request read yet, or the app still waiting for it)."""
    status, body = error_body(exc, ollama=ollama)
    payload = json.dumps(body).encode()
    phrase = {408: "Request Timeout", 503: "Service Unavailable"}.get(status, "Error")
    lines = [f"HTTP/1.1 {status} {phrase}", "content-type: application/json", f"content-length: {len(payload)}"]
    lines += ["connection: close", *(["retry-after: 1"] if status == 503 else []), "", ""]
    return "\r\n".join(lines).encode() + payload


class LimitedProtocol(H11Protocol):
    """:class:`H11Protocol` with the head and body timeouts, the connection cap and the
    lingering close described in this module's docstring."""

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self._closing = False
        self._waiting_since = 0.0  # when this connection last started waiting for its client

    # -------------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()
        # Closing connections do not count: they are gone within LINGER_SECONDS (or the next loop
        # turn), and counting them would let a burst of refusals or resets refuse every newcomer.
        closing = sum(1 for c in self.connections if isinstance(c, LimitedProtocol) and c.is_closing())
        if len(self.connections) - closing > self.limits.max_connections:
            victim = self._longest_waiting()
            if victim is not None:
                self.limits.refusals.note("evicted")
                victim._close_lingering(self._too_many(), linger=False)
            else:
                self.limits.refusals.note("too_many_connections")
                # Lingering holds a descriptor a little longer: only as many as the cap allows.
                self._close_lingering(self._too_many(), linger=closing < self.limits.max_connections)

    def is_closing(self) -> bool:
        """Whether this connection is on its way out (lingering, or its transport closed and the
        loop yet to report it lost): it no longer counts toward ``max_connections``."""
        return self._closing or self.transport.is_closing()

    def _too_many(self) -> bytes:
        error = TooManyConnectionsError(
            f"too many open connections (max_connections={self.limits.max_connections}); retry later"
        )
        return raw_error_response(error)

    def _longest_waiting(self) -> LimitedProtocol | None:
        """The open connection (not this one) that has waited longest for its client to send a
        request head or body, or None when every other one has a request running."""
        waiting = [
            c for c in self.connections if isinstance(c, LimitedProtocol) and c is not self and c._waits_for_client()
        ]
        return min(waiting, key=lambda c: c._waiting_since, default=None)

    def _waits_for_client(self) -> bool:
        if self._closing or self.transport.is_closing():
            return False
        state = self.conn.their_state
        if state is h11.IDLE:
            return self.cycle is None or self.cycle.response_complete
        return state is h11.SEND_BODY and (self.cycle is None or not self.cycle.response_started)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return  # read and dropped while the answer reaches the client
        super().data_received(data)
        self._follow_request_state()

    def eof_received(self) -> bool | None:
        if self._closing:
            self.transport.close()  # the client is done too: nothing left to linger for
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    # -------------------------------------------------------------------- uvicorn hooks

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing() or self._closing:
            return
        if self.conn.their_state is h11.SEND_BODY:
            # Answered before the body was read (401, 413...): the connection cannot carry another
            # request, and reading the rest would let a client trickle bytes into it forever.
            self._unset_keepalive_if_required()
            self._close_lingering(b"")
            return
        self._follow_request_state()
        if self.conn.their_state is h11.IDLE:
            self._arm_head_timer()  # the next request's head must come in time too

    def shutdown(self) -> None:
        if self._closing:
            self.transport.close()
            return
        super().shutdown()

    # -------------------------------------------------------------------- timers

    def _follow_request_state(self) -> None:
        """Start or stop the head and body clocks as the request moves along."""
        state = self.conn.their_state
        if state is not h11.IDLE:
            self._cancel("_head_timer")  # a whole request head arrived
        if state is h11.SEND_BODY:
            if self._body_timer is None:
                self._body_timer = self.loop.call_later(self.limits.body_timeout, self._body_timeout)
        else:
            self._cancel("_body_timer")

    def _arm_head_timer(self) -> None:
        self._waiting_since = self.loop.time()
        self._cancel("_head_timer")
        self._head_timer = self.loop.call_later(self.timeout_keep_alive, self._head_timeout)

    def _cancel(self, name: str) -> None:
        timer = getattr(self, name)
        if timer is not None:
            timer.cancel()
            setattr(self, name, None)

    def _cancel_timers(self) -> None:
        for name in ("_head_timer", "_body_timer", "_linger_timer"):
            self._cancel(name)

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing() and not self._closing:
            if self._received_some():  # an idle keep-alive connection is closed without a word
                self.limits.refusals.note("head_timeout")
            self.transport.close()

    def _received_some(self) -> bool:
        """Whether a partial request head is buffered (a slow head, not an idle keep-alive)."""
        return bool(self.conn.trailing_data[0])

    def _body_timeout(self) -> None:
        self._body_timer = None
        if self.conn.their_state is not h11.SEND_BODY or self.transport.is_closing() or self._closing:
            return
        self.limits.refusals.note("body_timeout")
        answer = b""
        if self.cycle is not None and not self.cycle.response_started:
            path = str(self.scope["path"]) if self.scope else ""
            error = RequestTimeoutError(
                f"the request body did not arrive within {self.limits.body_timeout:g} s (body_timeout)"
            )
            answer = raw_error_response(error, ollama=path.startswith("/api/"))
        self._close_lingering(answer)

    # -------------------------------------------------------------------- closing

    def _close_lingering(self, answer: bytes, *, linger: bool = True) -> None:
        """Write ``answer``, shut the sending side and close after :data:`LINGER_SECONDS`
        (at once without ``linger``), dropping what the client still sends; the app (if
        running) sees a disconnect."""
        self._closing = True
        self._cancel_timers()
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.scope[CUT_OFF] = True  # type: ignore[typeddict-unknown-key]
            self.cycle.disconnected = True  # the app's next receive() is http.disconnect, its sends dropped
            self.cycle.message_event.set()
        if answer:
            self.transport.write(answer)
        if not linger:
            self.transport.close()  # its slot is needed now; the answer is flushed first
            return
        try:
            if self.transport.can_write_eof():
                self.transport.write_eof()
        except OSError:  # the client reset the connection already: nothing to linger for
            self.transport.close()
            return
        self.flow.resume_reading()
        self._linger_timer = self.loop.call_later(LINGER_SECONDS, self.transport.close)

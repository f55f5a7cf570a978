"""A fair FIFO scheduler in front of the engine.

Requests wait in one bounded queue and run one at a time, in arrival order, on a worker
thread that owns the engine while it generates; the event loop only moves tokens to
clients. A request whose client went away is cancelled: if it still waits, it is dropped;
if it runs, its :class:`lmx.TokenStream` is closed after the current token, so the next
request starts at once.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from lmx.results import Token
from lmx.server.errors import QueueFullError

logger = logging.getLogger(__name__)

EventKind = Literal["token", "end", "error"]


@dataclass(frozen=True)
class Event:
    """What a job reports to the request handler: a token, its end, or the error that ended it."""

    kind: EventKind
    token: Token | None = None
    error: BaseException | None = None


@dataclass
class SchedulerStats:
    """Counts since the scheduler started (and the current load)."""

    running: int = 0
    waiting: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    rejected: int = 0


class Job:
    """One request in the scheduler: a token stream to run and the channel its events go to."""

    def __init__(self, stream: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.stream = stream
        self._loop = loop
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._cancelled = threading.Event()
        self._on_cancel: Any = None
        self.started = False
        self.generated = 0

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop the job: drop it if it waits, close its stream after the current token if it runs."""
        if not self._cancelled.is_set():
            self._cancelled.set()
            if self._on_cancel is not None:
                self._on_cancel(self)

    async def next_event(self) -> Event:
        """The next event (waits for it)."""
        return await self._events.get()

    def _push(self, event: Event) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self._cancelled.set()


class Scheduler:
    """Runs jobs one at a time, first come first served, with a bounded wait queue.

    Args:
        max_queue: how many jobs may wait behind the running one; :meth:`submit` raises
            :class:`QueueFullError` beyond that.
    """

    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._queue: collections.deque[Job] = collections.deque()
        self._running: Job | None = None
        self._stats = SchedulerStats()
        self._thread: threading.Thread | None = None
        self._idle = threading.Event()  # set once the worker has stopped after close()
        self._closed = False

    def stats(self) -> SchedulerStats:
        """A snapshot of the counts."""
        with self._lock:
            s = self._stats
            return SchedulerStats(
                running=int(self._running is not None),
                waiting=len(self._queue),
                completed=s.completed,
                cancelled=s.cancelled,
                failed=s.failed,
                rejected=s.rejected,
            )

    def submit(self, stream: Any) -> Job:
        """Queue a token stream (an :class:`lmx.TokenStream` not yet iterated) to run.

        Must be called from the event loop that will read the job's events.

        Raises:
            QueueFullError: the wait queue holds ``max_queue`` jobs already.
        """
        job = Job(stream, asyncio.get_running_loop())
        with self._lock:
            if self._closed:
                raise QueueFullError("the server is shutting down; no new requests are accepted")
            # One job runs; max_queue more may wait (one just queued but not yet started counts as waiting).
            if len(self._queue) + (self._running is not None) >= self.max_queue + 1:
                self._stats.rejected += 1
                raise QueueFullError(
                    f"server busy: {len(self._queue)} requests already wait (max_queue={self.max_queue}); retry later"
                )
            self._queue.append(job)
            job._on_cancel = self._discard
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="lmx-scheduler", daemon=True)
                self._thread.start()
            self._wakeup.notify()
        return job

    def close(self, timeout: float | None = 10.0) -> None:
        """Cancel every job and stop the worker thread. Idempotent."""
        with self._lock:
            self._closed = True
            waiting, running = list(self._queue), self._running
            self._wakeup.notify()
            thread = self._thread
        for job in waiting:
            job.cancel()
            job._push(Event("error", error=QueueFullError("the server is shutting down")))
        if running is not None:
            running.cancel()
        if thread is not None and thread is not threading.current_thread():
            self._idle.wait(timeout)  # the worker parks rather than ends: see _work

    def _discard(self, job: Job) -> None:
        """A waiting job was cancelled: free its place in the queue now."""
        with self._lock:
            try:
                self._queue.remove(job)
            except ValueError:  # already running or done
                return
            self._stats.cancelled += 1
        job.stream.close()

    # ------------------------------------------------------------------ worker
    def _next_job(self) -> Job | None:
        with self._lock:
            while not self._queue and not self._closed:
                self._wakeup.wait()
            if not self._queue:
                return None
            job = self._queue.popleft()
            self._running = job
            return job

    def _work(self) -> None:
        while (job := self._next_job()) is not None:
            outcome = self._run(job)
            with self._lock:
                self._running = None
                setattr(self._stats, outcome, getattr(self._stats, outcome) + 1)
        self._idle.set()
        # Park instead of returning. MLX keeps a compile cache per thread whose destructor
        # takes the GIL when the thread ends; if that happens while the interpreter shuts
        # down (a server stopped just before exit) the process aborts ("terminate called
        # without an active exception", mlx 0.32). A parked daemon thread never runs it.
        threading.Event().wait()

    def _run(self, job: Job) -> str:
        """Run one job to its end; the name of the counter it ends in."""
        job.started = True
        outcome, final = "completed", Event("end")
        try:
            tokens: Iterator[Token] = iter(job.stream)
            while True:
                if job.cancelled:
                    logger.debug("request cancelled after %d tokens", job.generated)
                    outcome = "cancelled"
                    break
                try:
                    token = next(tokens)
                except StopIteration:
                    break
                job.generated += 1
                job._push(Event("token", token=token))
        except Exception as e:  # the error goes to the request that caused it, not the worker
            logger.debug("request failed: %r", e)
            outcome, final = "failed", Event("error", error=e)
        finally:
            # Closing frees the engine and settles the stream's metrics before the end is reported.
            try:
                job.stream.close()
            except Exception:
                logger.exception("closing a token stream failed")
        job._push(final)
        return outcome

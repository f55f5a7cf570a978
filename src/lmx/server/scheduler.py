"""A fair FIFO scheduler in front of the engine.

Requests wait in one bounded queue and run in arrival order on a worker thread that owns
the engine while it generates; the event loop only moves tokens to clients. With
``max_batch`` > 1, the worker takes the first waiting request together with up to
``max_batch - 1`` later ones that can share its batch (same sampling options) and runs
them as one padded batch; each client still gets its own tokens as they are made, and its
response ends when its own row does. A request whose client went away is cancelled: if it
still waits, it is dropped; if it runs, it gets no more tokens (alone, its
:class:`lmx.TokenStream` is closed after the current token, so the next request starts at once).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from lmx.generate.batch import batch_key
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
    batches: int = 0  # runs of more than one request together


RunBatch = Callable[[list[Any], Callable[[int], bool]], Iterator[tuple[int, Token]]]


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
    """Runs jobs first come first served, alone or in batches, with a bounded wait queue.

    Args:
        max_queue: how many jobs may wait behind the running ones; :meth:`submit` raises
            :class:`QueueFullError` beyond that.
        max_batch: the most jobs run together.
        run_batch: runs several jobs' streams as one batch (``(streams, cancelled)`` ->
            ``(index, token)`` pairs, see :func:`lmx.generate.batch.stream_batch`); needed
            when ``max_batch`` > 1.
    """

    def __init__(self, max_queue: int, max_batch: int = 1, run_batch: RunBatch | None = None) -> None:
        self.max_queue = max_queue
        self.max_batch = max_batch if run_batch is not None else 1
        self._run_batch_fn = run_batch
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._queue: collections.deque[Job] = collections.deque()
        self._running: list[Job] = []
        self._stats = SchedulerStats()
        self._thread: threading.Thread | None = None
        self._idle = threading.Event()  # set once the worker has stopped after close()
        self._closed = False

    def stats(self) -> SchedulerStats:
        """A snapshot of the counts."""
        with self._lock:
            s = self._stats
            return SchedulerStats(
                running=len(self._running),
                waiting=len(self._queue),
                completed=s.completed,
                cancelled=s.cancelled,
                failed=s.failed,
                rejected=s.rejected,
                batches=s.batches,
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
            # max_batch jobs run; max_queue more may wait (one just queued but not yet started counts as waiting).
            if len(self._queue) + len(self._running) >= self.max_queue + self.max_batch:
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
            waiting, running = list(self._queue), list(self._running)
            self._wakeup.notify()
            thread = self._thread
        for job in waiting:
            job.cancel()
            job._push(Event("error", error=QueueFullError("the server is shutting down")))
        for job in running:
            job.cancel()
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
    def _next_jobs(self) -> list[Job]:
        """The first waiting job and the later ones that can share its batch (none: closed)."""
        with self._lock:
            while not self._queue and not self._closed:
                self._wakeup.wait()
            if not self._queue:
                return []
            jobs = [self._queue.popleft()]
            key = _key(jobs[0]) if self.max_batch > 1 else None
            if key is not None:
                for job in list(self._queue):
                    if len(jobs) == self.max_batch:
                        break
                    if _key(job) == key:
                        self._queue.remove(job)
                        jobs.append(job)
            self._running = jobs
            return jobs

    def _work(self) -> None:
        while jobs := self._next_jobs():
            outcomes = [self._run(jobs[0])] if len(jobs) == 1 else self._run_batch(jobs)
            with self._lock:
                self._running = []
                self._stats.batches += len(jobs) > 1
                for outcome in outcomes:
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

    def _run_batch(self, jobs: list[Job]) -> list[str]:
        """Run jobs as one batch; each job's end is reported as soon as its row ends."""
        ended = [False] * len(jobs)
        outcomes = ["completed"] * len(jobs)
        for job in jobs:
            job.started = True
        assert self._run_batch_fn is not None
        try:
            for i, token in self._run_batch_fn([j.stream for j in jobs], lambda i: jobs[i].cancelled):
                job = jobs[i]
                job.generated += 1
                job._push(Event("token", token=token))
                if token.finish_reason is not None:
                    ended[i] = True
                    job._push(Event("end"))
        except Exception as e:  # the error goes to every request still running, not the worker
            logger.debug("batch failed: %r", e)
            for i, job in enumerate(jobs):
                if not ended[i] and not job.cancelled:
                    ended[i], outcomes[i] = True, "failed"
                    job._push(Event("error", error=e))
        for i, job in enumerate(jobs):
            if job.cancelled and outcomes[i] == "completed" and not ended[i]:
                outcomes[i] = "cancelled"
            if not ended[i]:
                job._push(Event("end"))
        return outcomes


def _key(job: Job) -> tuple | None:
    request = getattr(job.stream, "request", None)
    return None if request is None or job.cancelled else batch_key(request[1])

"""A thread that queues decode steps while the caller's thread builds the next one.

On a GPU a one-token decode step is bound by the host: building its graph (Python, and the
compiled segments' replays) and then queueing it (``mx.async_eval``: MLX encodes every op for
the device) take longer than the device takes to run it (benchmarks/RESULTS.md). The two are
serial on one thread. :class:`StepEncoder` moves the queueing to a thread of its own, which MLX
runs without Python's lock, so step n+1 is built while step n is being queued: a step then costs
the longer of the two instead of their sum.

MLX ties a stream to the thread that made it; the encoder's stream is one made to be used from
any thread (``mx.new_thread_unsafe_stream``), and everything the two threads touch is ordered
by the step loop: the caller builds a step only from arrays of steps already handed over, hands
a step over only after the previous one is queued, and reads a token only after its step is
queued (:func:`lmx.generate.step.generate_step`).
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from typing import Any

import mlx.core as mx


class Queued:
    """One hand-over: ``wait()`` returns once the encoder has queued the arrays (their values
    are then on their way: reading one waits for the device only), or raises what queueing raised."""

    __slots__ = ("arrays", "done", "error")

    def __init__(self, arrays: tuple[Any, ...]) -> None:
        self.arrays: tuple[Any, ...] | None = arrays
        self.done = threading.Event()
        self.error: BaseException | None = None

    def wait(self) -> None:
        self.done.wait()
        if self.error is not None:
            raise self.error


_LIVE: weakref.WeakSet[StepEncoder] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """End every encoder's thread before the interpreter goes: MLX keeps per-thread state that
    must be torn down by its own thread (left to the process's end, it aborts the process)."""
    for encoder in list(_LIVE):
        encoder.close()


def _serve(jobs: queue.SimpleQueue) -> None:
    while (job := jobs.get()) is not None:
        try:
            mx.async_eval(*job.arrays)
        except BaseException as e:  # handed to the caller's thread by wait()
            job.error = e
        finally:
            job.arrays = None  # the step's graph is the caller's to free
            job.done.set()


class StepEncoder:
    """A thread that runs ``mx.async_eval`` for the step loop, and the stream its steps are built on.

    Args:
        device: the device whose steps it queues (on the CPU MLX's own stream thread already
            computes off the caller's thread; what moves here is the graph's traversal, which pays
            only where the host bounds a step: tiny models, benchmarks/RESULTS.md).
    """

    def __init__(self, device: mx.Device | mx.DeviceType = mx.gpu) -> None:
        self.stream = mx.new_thread_unsafe_stream(device)
        self.submitted = 0  # steps handed over
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=_serve, args=(self._jobs,), name="lmx-step-encoder", daemon=True)
        self._thread.start()
        weakref.finalize(self, self._jobs.put, None)  # the thread ends with its encoder
        _LIVE.add(self)

    def submit(self, *arrays: Any) -> Queued:
        """Hand ``arrays`` (built on :attr:`stream`) over to be queued; returns at once."""
        job = Queued(arrays)
        self.submitted += 1
        self._jobs.put(job)
        return job

    def close(self) -> None:
        """End the thread (after what was handed over); idempotent."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()

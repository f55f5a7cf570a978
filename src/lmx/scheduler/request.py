"""A request in the scheduler, and where its tokens go.

A :class:`Request` carries its prompt ids and its own options; the scheduler fills in its
metrics and hands its tokens to its :class:`Sink` as they are made. A sink is how a caller
listens: :class:`QueueSink` for a thread that iterates (:class:`lmx.TokenStream`); the server
has its own that posts to its event loop.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from typing import Protocol

from lmx.generate.options import GenerationOptions
from lmx.models.image_prompt import ImagePrompt
from lmx.results import GenerationMetrics, Token


class Sink(Protocol):
    """Receives one request's tokens, then its end."""

    def token(self, token: Token) -> None:
        """A token was made (the last one carries a finish reason)."""

    def end(self, error: BaseException | None) -> None:
        """The request ended: normally, cancelled (``error`` None) or with ``error``."""


class AdapterRouter(Protocol):
    """Per-row LoRA adapters (:class:`lmx.train.adapters.AdapterSet`): which adapter each row
    of the next forward pass uses."""

    def route(self, names: Sequence[str | None]) -> bool:
        """Route the rows (None: the base model); return whether any row uses an adapter."""


class Request:
    """One generation request: prompt ids, options, and what the scheduler records of it."""

    def __init__(
        self, ids: Sequence[int], options: GenerationOptions, sink: Sink, limit: int, images: ImagePrompt | None = None
    ) -> None:
        self.ids = list(ids)
        self.images = images  # the prompt's images (their soft tokens' positions and features), if any
        # What the prefix cache keys this prompt by: the ids, each image soft token replaced by a
        # key of its image's content (the same text with another image must not hit).
        self.cache_ids = self.ids if images is None else images.cache_ids(self.ids)
        self.options = options
        self.sink = sink
        self.limit = limit  # the most tokens it may generate (max_tokens within the context)
        self.metrics = GenerationMetrics(prompt_tokens=len(self.ids))
        self.submitted = time.perf_counter()
        self.prefill_started = 0.0
        self.first_token_at = 0.0
        self.generated: list[int] = []
        self.finish_reason: str | None = None
        self.sync_id: int | None = None  # its number in a tensor-parallel group (lmx.scheduler.sync)
        # In a tensor-parallel group a cancel takes effect when the leader shares it, at a turn's start
        self.defer_cancel = False
        self._asked = threading.Event()
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def cancel_asked(self) -> bool:
        """Whether :meth:`cancel` was called (``cancelled`` may follow later, see ``defer_cancel``)."""
        return self._asked.is_set()

    def cancel(self) -> None:
        """Ask the scheduler to stop this request (it ends with finish reason ``cancelled``)."""
        self._asked.set()
        if not self.defer_cancel:
            self._cancelled.set()

    def confirm_cancel(self) -> None:
        """Make an asked cancel take effect (the scheduler does, when every rank knows of it)."""
        self._cancelled.set()


class QueueSink:
    """A sink read by one thread: :meth:`get` blocks for the next token, None at the end."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Token | None, BaseException | None]] = queue.SimpleQueue()

    def token(self, token: Token) -> None:
        self._queue.put((token, None))

    def end(self, error: BaseException | None) -> None:
        self._queue.put((None, error))

    def get(self) -> Token | None:
        """The next token; None once the request ended. Raises the request's error."""
        token, error = self._queue.get()
        if error is not None:
            raise error
        return token


__all__ = ["AdapterRouter", "QueueSink", "Request", "Sink"]

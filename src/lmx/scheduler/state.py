"""The scheduler's state: its configuration and counters, the rows of the decode batch, a
prefill in progress, and the small records the worker loop keeps (:mod:`lmx.scheduler.core`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from lmx.generate.row import RowOutput, RowSampler
from lmx.generate.speculative import Drafter
from lmx.models.cache import KVCache
from lmx.scheduler.prefix_cache import PrefixStats
from lmx.scheduler.request import Request


@dataclass
class SchedulerStats:
    """Counts since the scheduler started, and its load now."""

    running: int = 0
    waiting: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    rejected: int = 0
    steps: int = 0
    batched_steps: int = 0  # decode steps that ran more than one row
    speculative_steps: int = 0  # verify passes of a speculating row (counted in steps too)
    draft_tokens: int = 0  # tokens drafted for them, and how many of those were accepted
    accepted_tokens: int = 0
    max_batch_seen: int = 0
    kv_bytes: int = 0
    prefix: PrefixStats = field(default_factory=PrefixStats)
    seconds: dict[str, float] = field(default_factory=dict)  # time in each phase of the loop


@dataclass
class SchedulerConfig:
    """How the scheduler runs.

    Attributes:
        max_batch: the most rows decoded together.
        max_queue: the most requests waiting to start; beyond it :meth:`Scheduler.submit`
            raises :class:`QueueFullError`.
        prefill_step_size: prompt tokens prefilled per turn of the loop (one chunk).
        prefix_cache_bytes: the prefix cache's bound (0: off).
        step_timeout: in a tensor-parallel group, seconds after which a turn that has not finished
            means a rank is gone (a collective waiting on a dead peer may never return): every
            request ends with :class:`GroupLostError` and the scheduler stops.
        kv_itemsize: bytes per element of the keys and values (of their scales, when quantized).
        kv_bits: store keys and values quantized to 8 or 4 bits (None: in float).
        kv_group_size: elements of a head per scale and bias of the quantized keys and values.
    """

    max_batch: int = 32
    max_queue: int = 1024
    prefill_step_size: int = 512
    prefix_cache_bytes: int = 1 << 30
    kv_itemsize: int = 4
    step_timeout: float = 120.0
    kv_bits: int | None = None
    kv_group_size: int = 64


class Row:
    """A request in the decode batch."""

    def __init__(self, request: Request, sampler: RowSampler, output: RowOutput, start: int) -> None:
        self.request, self.sampler, self.output, self.start = request, sampler, output, start
        self.done: str | None = None  # finish reason once ended
        self.drafter: Drafter | None = None  # made when the row first speculates


@dataclass
class Prefill:
    """Requests being prefilled together (one, or several short fresh prompts left-padded)."""

    rows: list[Row]
    caches: list[KVCache]
    tokens: mx.array  # (G, L) not yet run
    pad: mx.array | None
    started: float = field(default_factory=time.perf_counter)
    first: tuple[mx.array, mx.array] | None = None  # sampled first tokens and logprobs once done


class Batch:
    """The live rows, their caches and their last step's (lazy) tokens."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.caches: list[KVCache] = []
        self.tokens: mx.array | None = None  # (B,)
        self.logprobs: mx.array | None = None  # (B, V)
        # With a step encoder (lmx.generate.encoder): copies of the last step's ids and chosen
        # log-probabilities, queued with it, for the emit to read while the next step, which holds
        # ``tokens``, is being queued; and the ``tokens`` they were made from (valid while the same).
        self.handed: tuple[mx.array, mx.array, mx.array] | None = None

    def handed_values(self) -> tuple[list[int], list[float]] | None:
        """The last step's ids and chosen log-probabilities from :attr:`handed`, if it is that step's."""
        if self.handed is None or self.handed[2] is not self.tokens:
            return None
        return self.handed[0].tolist(), self.handed[1].tolist()

    def pad(self) -> mx.array | None:
        starts = [r.start for r in self.rows]
        return mx.array(starts, dtype=mx.int32) if any(starts) else None


class Clock:
    """Adds the time since the last lap to ``totals[name]`` (the loop's phases, in stats)."""

    def __init__(self, totals: dict[str, float]) -> None:
        self.totals = totals
        self.t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.totals[name] = self.totals.get(name, 0.0) + now - self.t
        self.t = now


class Exclusive:
    """Whole-model work run by the worker between two steps (classify, embeddings), and its outcome."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


__all__ = ["Batch", "Clock", "Exclusive", "Prefill", "Row", "SchedulerConfig", "SchedulerStats"]

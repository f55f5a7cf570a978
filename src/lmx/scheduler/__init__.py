"""The scheduler layer: requests with their own options, continuous batching, a prefix cache,
admission by memory. See :mod:`lmx.scheduler.core`."""

from lmx.scheduler.core import Scheduler, SchedulerConfig, SchedulerStats, make_request
from lmx.scheduler.prefix_cache import PrefixCache, PrefixStats
from lmx.scheduler.request import QueueSink, Request, Sink

__all__ = [
    "PrefixCache",
    "PrefixStats",
    "QueueSink",
    "Request",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerStats",
    "Sink",
    "make_request",
]

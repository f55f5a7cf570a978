"""The scheduler layer: requests with their own options, continuous batching, a prefix cache,
admission by memory. See :mod:`lmx.scheduler.core`."""

from lmx.scheduler.core import Scheduler, make_request
from lmx.scheduler.prefix_cache import PrefixCache, PrefixStats
from lmx.scheduler.request import QueueSink, Request, Sink
from lmx.scheduler.state import SchedulerConfig, SchedulerStats

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

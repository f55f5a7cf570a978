"""A prefix cache across requests: the KV caches of earlier prompts, keyed by their tokens.

Entries are single-row cache sets whose positions are the entry's tokens. A new request takes
the entry sharing the longest usable prefix with its prompt and prefills only the rest. The
cache is bounded in bytes and drops the least recently used entries first; the scheduler also
drops entries when a request needs their memory.

An entry's sliding-window layers hold only their last ``window - 1 + slack`` positions, so an
entry can serve a prefix shorter than itself only while that window is still held (see
:func:`lmx.models.batch_cache.can_copy_prefix`); the scheduler stores each prompt when its
prefill ends, so a shared system prompt followed by different questions is served from the
entry of the first question.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lmx.models import batch_cache
from lmx.models.cache import KVCache


@dataclass
class _Entry:
    tokens: np.ndarray  # (T,) int64
    caches: list[KVCache]
    nbytes: int
    namespace: str | None = None  # the LoRA adapter its keys and values were computed with


# With many entries, a prompt is compared only with those sharing its first BUCKET_TOKENS tokens
# (a shorter hit is rarely worth taking), so a lookup stays short; up to SCAN_ALL, with all.
BUCKET_TOKENS = 8
SCAN_ALL = 64


def _bucket(ids: Sequence[int], namespace: str | None) -> tuple[str | None, tuple[int, ...]]:
    return namespace, tuple(ids[:BUCKET_TOKENS])


@dataclass
class PrefixStats:
    """Counts of the prefix cache since it was made."""

    entries: int = 0
    bytes: int = 0
    lookups: int = 0
    hits: int = 0
    hit_tokens: int = 0


class PrefixCache:
    """LRU of single-row KV cache sets keyed by token prefix.

    Args:
        max_bytes: the most bytes the entries may hold (0 turns the cache off).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self._entries: collections.OrderedDict[int, _Entry] = collections.OrderedDict()
        self._buckets: dict[tuple[str | None, tuple[int, ...]], set[int]] = {}
        self._next = 0
        # The scheduler's worker changes the entries; stats and admission read them from others.
        self._lock = threading.RLock()
        self._stats = PrefixStats()

    @property
    def nbytes(self) -> int:
        """Bytes held by the entries."""
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def stats(self) -> PrefixStats:
        with self._lock:
            s = self._stats
            return PrefixStats(len(self._entries), self.nbytes, s.lookups, s.hits, s.hit_tokens)

    def lookup(self, ids: Sequence[int], namespace: str | None = None) -> tuple[list[KVCache] | None, int]:
        """Fresh caches holding the longest usable cached prefix of ``ids`` (at most
        ``len(ids) - 1`` tokens: the last prompt token always runs, for its logits), and its
        length. Only entries stored under the same ``namespace`` (adapter) are used."""
        with self._lock:
            self._stats.lookups += 1
            if not self._entries or len(ids) < 2:
                return None, 0
            query = np.asarray(ids, dtype=np.int64)
            best, best_n = None, 0
            for key in self._candidates(ids, namespace):
                entry = self._entries[key]
                n = _common(entry.tokens, query)
                n = min(n, len(ids) - 1)
                if n > best_n and batch_cache.can_copy_prefix(entry.caches, n):
                    best, best_n = key, n
            if best is None:
                return None, 0
            self._entries.move_to_end(best)
            self._stats.hits += 1
            self._stats.hit_tokens += best_n
            return batch_cache.copy_prefix(self._entries[best].caches, best_n), best_n

    def store(self, ids: Sequence[int], caches: list[KVCache], namespace: str | None = None) -> None:
        """Keep ``caches`` (single-row, positions = ``ids``; not written to afterwards) as an
        entry of ``namespace`` (the adapter they were computed with).

        An entry whose tokens are a prefix of ``ids`` and that a copy of the new one can serve
        as well is dropped; so is one equal to it."""
        with self._lock:
            if self.max_bytes == 0 or not ids or caches[0].offset != len(ids):
                return
            size = batch_cache.nbytes(caches)
            if size > self.max_bytes:
                return
            tokens = np.asarray(ids, dtype=np.int64)
            for key in list(self._candidates(ids, namespace)):
                entry = self._entries[key]
                n = len(entry.tokens)
                if n <= len(tokens) and _common(entry.tokens, tokens) == n and batch_cache.can_copy_prefix(caches, n):
                    self._drop(key)
            self._entries[self._next] = _Entry(tokens, caches, size, namespace)
            self._buckets.setdefault(_bucket(ids, namespace), set()).add(self._next)
            self._next += 1
            self.evict(self.max_bytes)

    def _candidates(self, ids: Sequence[int], namespace: str | None) -> list[int]:
        """Entries of ``namespace`` worth comparing with ``ids``, least recently used first: all
        of them while they are few; else those sharing its first ``BUCKET_TOKENS`` tokens (for a
        shorter prompt, those it is a prefix of)."""
        if len(self._entries) <= SCAN_ALL:
            return [k for k, e in self._entries.items() if e.namespace == namespace]
        space, head = _bucket(ids, namespace)
        if len(head) == BUCKET_TOKENS:
            keys = self._buckets.get((space, head), set())
        else:
            keys = {k for (n, b), ks in self._buckets.items() if n == space and b[: len(head)] == head for k in ks}
        return [k for k in self._entries if k in keys]

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key)
        bucket = _bucket(entry.tokens.tolist(), entry.namespace)
        self._buckets[bucket].discard(key)
        if not self._buckets[bucket]:
            del self._buckets[bucket]

    def evict(self, keep_bytes: int) -> int:
        """Drop least recently used entries until at most ``keep_bytes`` are held; return the bytes freed."""
        with self._lock:
            freed = 0
            held = self.nbytes
            while self._entries and held - freed > keep_bytes:
                key = next(iter(self._entries))
                freed += self._entries[key].nbytes
                self._drop(key)
            return freed

    def clear(self, namespace: str | None = None) -> None:
        """Drop every entry, or (given ``namespace``) those of that adapter only."""
        with self._lock:
            if namespace is None:
                self._entries.clear()
                self._buckets.clear()
                return
            for key in [k for k, e in self._entries.items() if e.namespace == namespace]:
                self._drop(key)


def _common(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the common prefix of two id arrays."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


__all__ = ["PrefixCache", "PrefixStats"]

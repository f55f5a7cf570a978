"""Caches for rows of different lengths, as :mod:`lmx.classify_score` scores them.

:class:`RaggedCache` keeps every key's position (shared by all layers in a :class:`Positions`)
and gives RoPE a per-row offset, so rows padded on either side, or sharing a prefix they
broadcast, attend exactly to their own keys. :class:`JoinedCache` runs several short branches
of one text as one attention sequence over the text's keys (a trie of label prefixes).
:func:`join_rows` / :func:`split_rows` move between the two layouts.
"""

from __future__ import annotations

import mlx.core as mx


def join_rows(x: mx.array, n_texts: int) -> mx.array:
    """(texts x branches, heads, length, D) -> (texts, heads, branches x length, D)."""
    rows, heads, length, dim = x.shape
    x = x.reshape(n_texts, rows // n_texts, heads, length, dim).transpose(0, 2, 1, 3, 4)  # (texts, heads, n, L, D)
    return x.reshape(n_texts, heads, -1, dim)


def split_rows(x: mx.array, n: int, length: int) -> mx.array:
    """The inverse of :func:`join_rows`: (texts, heads, n x length, D) -> (texts x n, heads, length, D)."""
    n_texts, heads, _, dim = x.shape
    x = x.reshape(n_texts, heads, n, length, dim).transpose(0, 2, 1, 3, 4)  # (texts, n, heads, L, D)
    return x.reshape(n_texts * n, heads, length, dim)


class Positions:
    """The position of every cached key of a batch, shared by the caches of all layers.

    Invalid keys (padding, or prefix tokens a row does not share) are never attended to
    by a real query; a padding query attends only to itself, so no softmax row is empty.
    """

    def __init__(self, kpos: mx.array, kvalid: mx.array) -> None:
        self.kpos, self.kvalid = kpos, kvalid  # (B, S) int32, bool
        self.offset = mx.zeros((kpos.shape[0],), mx.int32)  # (B,) RoPE position of the chunk's first column
        self._qpos = self._qvalid = kpos[:, :0]
        self._masks: dict[int | None, mx.array] = {}

    def add(self, start: mx.array, qvalid: mx.array) -> None:
        """Announce the next chunk: (B,) position of its first column and (B, L) which are real."""
        qpos = start[:, None] + mx.arange(qvalid.shape[1], dtype=mx.int32)[None]  # (B, L)
        self.kpos = mx.concatenate([self.kpos, qpos], axis=1)
        self.kvalid = mx.concatenate([self.kvalid, qvalid], axis=1)
        self.offset, self._qpos, self._qvalid = start, qpos, qvalid
        self._masks = {}

    def mask(self, window: int | None) -> mx.array:
        """(B, 1, L, S) mask of the chunk just added, for layers with this sliding window."""
        if window not in self._masks:
            n_keys, n_queries = self.kpos.shape[1], self._qpos.shape[1]
            kpos, qpos = self.kpos[:, None, :], self._qpos[:, :, None]  # (B, 1, S), (B, L, 1)
            seen = self.kvalid[:, None, :] & (kpos <= qpos)
            if window is not None:
                seen = seen & (qpos - kpos < window)
            own = mx.arange(n_keys)[None, :] == (n_keys - n_queries + mx.arange(n_queries))[:, None]  # (L, S)
            self._masks[window] = mx.where(self._qvalid[:, :, None], seen, own[None])[:, None]
        return self._masks[window]


class RaggedCache:
    """One layer's keys/values for rows of different lengths (see :class:`Positions`).

    Follows the cache protocol the models use: ``offset`` (here a (B,) array, which RoPE
    takes as per-row offsets), ``update_and_fetch`` and ``make_mask``.
    """

    def __init__(
        self, positions: Positions, window: int | None, keys: mx.array | None = None, values: mx.array | None = None
    ) -> None:
        self.positions, self.window = positions, window
        self.keys, self.values = keys, values  # (B, n_kv, S, D)

    @property
    def offset(self) -> mx.array:
        return self.positions.offset

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if self.keys is None or self.values is None:
            self.keys, self.values = keys, values
        else:
            self.keys = mx.concatenate([self.keys, keys], axis=2)  # (B, n_kv, S + L, D)
            self.values = mx.concatenate([self.values, values], axis=2)
        return self.keys, self.values

    def make_mask(self, n_queries: int, pad: mx.array | None = None) -> mx.array:
        return self.positions.mask(self.window)


class JoinedCache:
    """One layer's keys/values for stage 2, where each text's branches run as one sequence.

    A text's branches are rows of the model's input (so that RoPE gives each its positions)
    but one sequence for attention: the text's keys/values are joined once with all of its
    branches' (not copied per branch), and the mask lets each branch see the text and its
    own earlier tokens only. Nothing is kept: stage 2 feeds each branch in one pass.
    """

    def __init__(self, keys: mx.array, values: mx.array, mask: mx.array) -> None:
        self.keys, self.values, self.mask = keys, values, mask  # (texts, n_kv, S, D), (texts, 1, T, S + T)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return mx.concatenate([self.keys, keys], axis=2), mx.concatenate([self.values, values], axis=2)

    def make_mask(self, n_queries: int, pad: mx.array | None = None) -> mx.array:
        return self.mask


__all__ = ["JoinedCache", "Positions", "RaggedCache", "join_rows", "split_rows"]

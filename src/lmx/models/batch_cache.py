"""Rows of a running batch in one set of KV caches: join, leave, copy out.

A batch holds every live row in the same per-layer caches (:mod:`lmx.models.cache`), one
batch index per row. All rows share the storage's write position (the caches' ``offset``);
row ``b`` starts at index ``starts[b]`` and what lies before is left padding, masked in every
layer. RoPE takes each row's own positions (``offset - starts``: see
:meth:`lmx.models.base.AttentionLayer.__call__`), so a row's keys are rotated exactly as if it
ran alone, and where it sits in the storage changes nothing but float rounding.

The functions here move rows between such cache sets without touching a row's values:

- :func:`merge` aligns two sets on their last position (the shorter one gets left padding) and
  stacks their rows: how prefilled requests join the running batch.
- :func:`select` keeps some rows (finished ones leave), :func:`trim_front` drops leading
  positions that every row has as padding (memory goes back, and a lone row runs unpadded).
- :func:`extract` copies one row out (for the prefix cache), :func:`copy_prefix` gives a
  fresh single-row cache set holding the first ``n`` positions of a stored one.

A cache's storage slots ``[0, held)`` hold positions ``[offset - held, offset)``; ``held`` is
``offset`` for a growing cache and the slots in use for a rotating (sliding-window) one.
Quantized caches move the same way: each array of their storage triple takes the same slot
operation (:func:`lmx.models.cache.smap`), so a row's quantized values are never requantized.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import mlx.core as mx

from lmx.models.cache import KVCache, RotatingKVCache, Storage, smap


def held(cache: KVCache) -> int:
    """Storage slots in use: they hold the positions ``[offset - held, offset)``."""
    if isinstance(cache, RotatingKVCache):
        return cache.used
    return cache.offset


def _keep(cache: KVCache) -> int | None:
    """The most slots a merged rotating cache keeps (None: a growing cache keeps all)."""
    if isinstance(cache, RotatingKVCache):
        return cache.window - 1 + cache.slack // 2
    return None


def _set(cache: KVCache, keys: Storage | None, values: Storage | None, offset: int, n_held: int) -> None:
    cache.keys, cache.values, cache.offset = keys, values, offset
    if isinstance(cache, RotatingKVCache):
        cache.used = n_held


def merge(
    a: Sequence[KVCache], a_starts: Sequence[int], b: Sequence[KVCache], b_starts: Sequence[int]
) -> tuple[list[int], list[int]]:
    """Append ``b``'s rows to ``a`` in place, aligned on their last position.

    Both are one cache per layer, of the same layouts; every cache must hold at least one
    position. The set with fewer positions gets left padding. Returns the new starts of
    ``a``'s rows and of ``b``'s rows (in the merged batch's index space).
    """
    offset_a, offset_b = a[0].offset, b[0].offset
    offset = max(offset_a, offset_b)
    for ca, cb in zip(a, b, strict=True):
        assert ca.keys is not None and cb.keys is not None and ca.values is not None and cb.values is not None
        ha, hb = held(ca), held(cb)
        k = max(ha, hb)
        cap = _keep(ca)
        if cap is not None:
            k = min(k, max(cap, 1))
        size = ca.capacity(k + 1)  # room for the next decode step: it writes without a copy
        join = partial(_joined, held_x=ha, held_y=hb, k=k, size=size)
        keys = smap(join, ca.keys, cb.keys)  # (Ba + Bb, n_kv, size, D)
        values = smap(join, ca.values, cb.values)
        _set(ca, keys, values, offset, k)
    return [s + offset - offset_a for s in a_starts], [s + offset - offset_b for s in b_starts]


def _joined(x: mx.array, y: mx.array, *, held_x: int, held_y: int, k: int, size: int) -> mx.array:
    """``x``'s rows then ``y``'s in storage of ``size`` slots: the last ``k`` of each one's first ``held_x`` /
    ``held_y`` slots end at slot ``k`` (zeros before them: left padding; after: room)."""
    out = mx.zeros((x.shape[0] + y.shape[0], x.shape[1], size, x.shape[3]), x.dtype)
    for rows, src, h in ((slice(0, x.shape[0]), x, held_x), (slice(x.shape[0], None), y, held_y)):
        part = src[..., max(0, h - k) : h, :]
        out[rows, :, k - part.shape[2] : k, :] = part
    return out


def select(caches: Sequence[KVCache], rows: Sequence[int]) -> None:
    """Keep only the batch rows ``rows`` (in that order), in place."""
    index = mx.array(list(rows), dtype=mx.int32)
    for c in caches:
        if c.keys is not None and c.values is not None:
            c.keys = smap(lambda a: a[index], c.keys)  # (len(rows), n_kv, S, D)
            c.values = smap(lambda a: a[index], c.values)


def trim_front(caches: Sequence[KVCache], n: int) -> None:
    """Drop the first ``n`` index positions (padding of every row), in place.

    Every row's RoPE position is ``offset - start``, so moving the index space down by ``n``
    (the caller lowers every start by ``n``) changes no row's positions.
    """
    if n <= 0:
        return
    for c in caches:
        h = held(c)
        offset = c.offset - n
        keep = min(h, offset)  # slots before the new index 0 are padding of every row
        if c.keys is None or c.values is None:
            continue
        _set(c, _slots(c.keys, h - keep, h), _slots(c.values, h - keep, h), offset, keep)


def extract(caches: Sequence[KVCache], row: int, start: int) -> list[KVCache]:
    """A single-row copy of batch row ``row`` (which starts at index ``start``); its own
    positions run from 0, as if it had run alone. The copy shares no memory with the batch."""
    out: list[KVCache] = []
    for c in caches:
        clone = _empty_like(c)
        assert c.keys is not None and c.values is not None
        h = held(c)
        n = min(h, c.offset - start)  # the row's own positions still held
        keys = smap(lambda a, s=h - n, e=h: mx.array(a[row : row + 1, :, s:e, :]), c.keys)  # (1, n_kv, n, D), a copy
        values = smap(lambda a, s=h - n, e=h: mx.array(a[row : row + 1, :, s:e, :]), c.values)
        _set(clone, keys, values, c.offset - start, n)
        out.append(clone)
    return out


def can_copy_prefix(caches: Sequence[KVCache], n: int) -> bool:
    """Whether :func:`copy_prefix` can give the first ``n`` positions of these single-row caches."""
    return 0 < n <= caches[0].offset and all(c.can_trim(c.offset - n) for c in caches)


def copy_prefix(caches: Sequence[KVCache], n: int) -> list[KVCache]:
    """Fresh single-row caches holding the first ``n`` positions of ``caches`` (see
    :func:`can_copy_prefix`); the originals are left as they are."""
    out: list[KVCache] = []
    for c in caches:
        clone = _empty_like(c)
        assert c.keys is not None and c.values is not None
        h = held(c)
        drop = c.offset - n
        keep = h - drop
        # Slicing makes new arrays: writes into the clone never reach the stored entry.
        _set(clone, _slots(c.keys, 0, keep), _slots(c.values, 0, keep), n, keep)
        out.append(clone)
    return out


def nbytes(caches: Sequence[KVCache]) -> int:
    """Bytes of storage the caches hold."""
    return sum(c.nbytes for c in caches)


def _slots(storage: Storage, start: int, stop: int) -> Storage:
    return smap(lambda a: a[..., start:stop, :], storage)


def _empty_like(cache: KVCache) -> KVCache:
    if isinstance(cache, RotatingKVCache):
        return RotatingKVCache(cache.window, cache.slack, cache.quant)
    return KVCache(cache.quant)


__all__ = ["can_copy_prefix", "copy_prefix", "extract", "held", "merge", "nbytes", "select", "trim_front"]

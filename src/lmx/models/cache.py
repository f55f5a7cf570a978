"""KV caches: objects with ``offset``, ``update_and_fetch``, ``make_mask``, ``state`` and ``trim``.

Both caches return keys/values in temporal order, the last key being position ``offset - 1``.
That single invariant lets one mask builder serve every layer, batch padding included.

A cache made with a :class:`KVQuant` stores its keys and values quantized (MLX's affine
layout, ``mx.quantize`` along the head dimension): its storage is then a triple of arrays
(packed values, scales, biases), each (B, n_kv, S, ·), and ``update_and_fetch`` returns such
triples, which attention takes as they are (:func:`lmx.models.base.attention`). The helpers
:func:`smap` and :func:`storage_nbytes` let code that moves slots around (``batch_cache``)
treat both kinds of storage alike: every slot operation is the same on each array.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

from lmx.errors import InvalidOptionError
from lmx.runtime.memory import room
from lmx.runtime.ops import span_mask

KV_BITS = (8, 4)
KV_GROUP_SIZES = (32, 64, 128)

# One layer's keys or values: an array (B, n_kv, S, D), or a quantized triple of arrays
# (packed (B, n_kv, S, D * bits / 32) uint32, scales and biases (B, n_kv, S, D / group_size)).
Storage = mx.array | tuple[mx.array, ...]


@dataclass(frozen=True)
class KVQuant:
    """How a cache quantizes its keys and values: ``bits`` per element, one scale and bias per
    ``group_size`` elements of a head (``mx.quantize``'s affine layout)."""

    bits: int
    group_size: int = 64

    def row_bytes(self, head_dim: int, itemsize: int) -> int:
        """Bytes one position of one head takes (keys or values): packed values, scales and biases
        (scales and biases take the keys' dtype, ``itemsize`` bytes each)."""
        return head_dim * self.bits // 8 + 2 * (head_dim // self.group_size) * itemsize


def kv_quant(bits: int | None, group_size: int = 64, head_dim: int | None = None) -> KVQuant | None:
    """The :class:`KVQuant` for ``bits`` (None: keys and values stay in float).

    Raises:
        InvalidOptionError: ``bits`` not 8, 4 or None; ``group_size`` not 32, 64 or 128; a
            ``head_dim`` that ``group_size`` does not divide.
    """
    if bits is None:
        return None
    if isinstance(bits, bool) or bits not in KV_BITS:
        raise InvalidOptionError(f"kv_bits must be one of 8, 4 or None (float), got {bits!r}")
    if isinstance(group_size, bool) or group_size not in KV_GROUP_SIZES:
        raise InvalidOptionError(f"kv_group_size must be one of 32, 64, 128, got {group_size!r}")
    if head_dim is not None and head_dim % group_size:
        raise InvalidOptionError(
            f"kv_group_size must divide the model's head_dim ({head_dim}), got {group_size}; try 32"
        )
    return KVQuant(bits, group_size)


def smap(fn: Callable[..., mx.array], *storages: Storage) -> Storage:
    """``fn`` applied to each array of the storages (one array each, or triples taken in step)."""
    if isinstance(storages[0], tuple):
        return tuple(fn(*parts) for parts in zip(*storages, strict=True))
    return fn(*storages)


def storage_nbytes(storage: Storage | None) -> int:
    """Bytes of a storage (all three arrays of a quantized one)."""
    if storage is None:
        return 0
    if isinstance(storage, tuple):
        return sum(a.nbytes for a in storage)
    return storage.nbytes


def slots(storage: Storage) -> int:
    """Positions a storage has room for (its axis 2)."""
    return (storage[0] if isinstance(storage, tuple) else storage).shape[2]


def _write(storage: Storage, new: Storage, start: int) -> None:
    """Write ``new`` into ``storage``'s slots from ``start``, in place. (Every storage array is 4-D:
    ``[:, :, a:b]`` is ``[..., a:b, :]``, and MLX builds it in a third of the time: a decode step
    writes two of them a layer.)"""
    if isinstance(storage, tuple):
        for dst, src in zip(storage, new, strict=True):
            dst[:, :, start : start + src.shape[2]] = src
    else:
        storage[:, :, start : start + new.shape[2]] = new


def _zeros(like: Storage, size: int) -> Storage:
    """Zeroed storage of ``size`` slots, shaped like ``like`` on every other axis."""
    return smap(lambda a: mx.zeros((a.shape[0], a.shape[1], size, a.shape[3]), a.dtype), like)  # (B, n_kv, size, ·)


def _cut(storage: Storage, start: int, stop: int) -> Storage:
    if isinstance(storage, tuple):
        return tuple(a[:, :, start:stop] for a in storage)
    return storage[:, :, start:stop]  # 4-D, as in _write


def build_mask(
    n_queries: int, n_keys: int, offset: int, window: int | None = None, pad: mx.array | None = None
) -> mx.array | None:
    """Boolean attention mask for the last ``n_queries`` of ``offset`` positions.

    Keys are the ``n_keys`` positions ending at ``offset - 1``; queries are the last
    ``n_queries`` positions. A query sees a key when the key is not in its future, lies
    within the sliding ``window`` (distance < window, as the reference does) and is not
    left padding (``pad[b]`` padded positions at the start of row ``b``).

    Returns:
        None when every query may see every key, else a (B or 1, 1, n_queries, n_keys) mask.
    """
    q_start, k_start = offset - n_queries, offset - n_keys
    causal_free = n_queries == 1
    window_free = window is None or (offset - 1) - k_start < window
    if causal_free and window_free and pad is None:
        return None
    qpos = mx.arange(q_start, offset)[:, None]
    kpos = mx.arange(k_start, offset)[None, :]
    mask = kpos <= qpos
    if window is not None:
        mask = mask & (qpos - kpos < window)
    mask = mask[None, None]  # (1, 1, Lq, Lk)
    if pad is not None:
        mask = mask & (kpos[None, None] >= pad[:, None, None, None])  # (B, 1, Lq, Lk)
    return mask


class KVCache:
    """A growing cache: storage is allocated in steps of ``step`` positions.

    Args:
        quant: store keys and values quantized (None: in their own dtype).
    """

    step = 256
    window: int | None = None
    # Set by a caller for one step: caches of the same layout share the masks built for it.
    masks: dict | None = None

    def __init__(self, quant: KVQuant | None = None) -> None:
        self.quant = quant
        self.keys: Storage | None = None
        self.values: Storage | None = None
        self.offset = 0

    def _stored(self, keys: mx.array, values: mx.array) -> tuple[Storage, Storage]:
        """New keys/values as the storage holds them (quantized along the head dimension, or as they are)."""
        if self.quant is None:
            return keys, values
        q = self.quant
        return (
            tuple(mx.quantize(keys, group_size=q.group_size, bits=q.bits)),
            tuple(mx.quantize(values, group_size=q.group_size, bits=q.bits)),
        )

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Storage, Storage]:
        """Append (B, n_kv, L, D) keys/values; return all cached ones, oldest first."""
        keys, values = self._stored(keys, values)
        prev, n_new = self.offset, slots(keys)
        if self.keys is None or prev + n_new > slots(self.keys):
            self._grow(keys, values, n_new)
        self.offset += n_new
        _write(self.keys, keys, prev)
        _write(self.values, values, prev)
        return _cut(self.keys, 0, self.offset), _cut(self.values, 0, self.offset)

    def reserve(self, n_new: int) -> int:
        """Make room for ``n_new`` more positions (the cache must hold some); return the
        storage index the first of them will take. Used by :class:`DecodeSlot`."""
        assert self.keys is not None and self.values is not None, "reserve() needs a filled cache"
        if self.offset + n_new > slots(self.keys):
            self._grow(self.keys, self.values, n_new)
        return self.offset

    def advance(self, keys: mx.array, values: mx.array, n_new: int) -> None:
        """Take the storage a :class:`DecodeSlot` wrote ``n_new`` positions into."""
        self.keys, self.values = keys, values
        self.offset += n_new

    def _grow(self, keys: Storage, values: Storage, n_new: int) -> None:
        size = room(n_new, self.step)
        new_k, new_v = _zeros(keys, size), _zeros(values, size)
        if self.keys is None or self.values is None:
            self.keys, self.values = new_k, new_v
            return
        kept_k, kept_v = _cut(self.keys, 0, self.offset), _cut(self.values, 0, self.offset)
        self.keys = smap(lambda a, b: mx.concatenate([a, b], axis=2), kept_k, new_k)
        self.values = smap(lambda a, b: mx.concatenate([a, b], axis=2), kept_v, new_v)

    def capacity(self, n: int) -> int:
        """The storage slots this cache allocates to hold ``n`` positions at once."""
        return room(n, self.step)

    def make_mask(self, n_queries: int, pad: mx.array | None = None) -> mx.array | str | None:
        """Mask for the queries just added (call after :meth:`update_and_fetch`); ``"causal"``
        where a plain causal mask is exact (MLX's attention kernels then build none)."""
        if pad is None and n_queries > 1:
            return "causal"
        return self._mask(n_queries, self.offset, pad)

    def first_keys(self, n_keys: int, pad: mx.array) -> mx.array:
        """For one new query per row, after :meth:`update_and_fetch` returned ``n_keys`` keys: the
        (B,) int32 index of the first of them that row ``b``'s query sees (the one-query case of
        :func:`build_mask` as an index: the row's own start; a rotating cache hands one query only
        keys inside its window). Shared by the caches of one layout, as masks are."""
        key = ("first", n_keys, self.offset, id(pad))
        if self.masks is not None and key in self.masks:
            return self.masks[key]
        k_start = self.offset - n_keys  # the position of key 0
        first = mx.maximum(pad - k_start, 0).astype(mx.int32)
        if self.masks is not None:
            self.masks[key] = first
        return first

    def _mask(self, n_queries: int, n_keys: int, pad: mx.array | None) -> mx.array | None:
        if self.masks is None:
            return build_mask(n_queries, n_keys, self.offset, self.window, pad)
        key = (n_queries, n_keys, self.offset, self.window, id(pad))
        if key not in self.masks:
            self.masks[key] = build_mask(n_queries, n_keys, self.offset, self.window, pad)
        return self.masks[key]

    def can_trim(self, n: int) -> bool:
        """Whether the last ``n`` positions can be dropped exactly."""
        return 0 <= n <= self.offset

    def trim(self, n: int) -> int:
        """Drop the last ``n`` positions; return how many were dropped."""
        n = max(0, min(self.offset, n))
        self.offset -= n
        return n

    @property
    def state(self) -> tuple[Storage, Storage] | tuple[()]:
        """The cached (keys, values), trimmed to ``offset``; ``()`` when empty."""
        if self.keys is None or self.values is None or self.offset == 0:
            return ()
        return _cut(self.keys, 0, self.offset), _cut(self.values, 0, self.offset)

    @property
    def nbytes(self) -> int:
        """Bytes held by the storage (allocated, not only used; all arrays of a quantized one)."""
        return storage_nbytes(self.keys) + storage_nbytes(self.values)


class RotatingKVCache(KVCache):
    """Cache of a sliding-window layer: memory stays bounded by ``window + slack``.

    New positions are appended in temporal order. The storage grows in blocks of ``step``
    positions, as a growing cache's does, up to ``window + slack``; when that is full, the newest
    ``window - 1 + slack // 2`` positions are moved to the front (one copy every ~slack/2
    tokens). Keeping ``slack // 2`` positions beyond the window is what makes a small
    :meth:`trim` exact (the chat case: drop a few tokens, then prefill the new turn), and
    a multi-token chunk arriving after the window has wrapped still sees, for each of its
    queries, exactly the ``window`` positions before it.
    """

    def __init__(self, window: int, slack: int = 256, quant: KVQuant | None = None) -> None:
        super().__init__(quant)
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self.slack = slack
        self.used = 0  # positions held in storage; the oldest is offset - used

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Storage, Storage]:
        """Append keys/values; return those the new queries can see, oldest first."""
        keys, values = self._stored(keys, values)
        n_new = slots(keys)
        self._make_room(keys, values, n_new)
        start = self.used
        self.used += n_new
        self.offset += n_new
        _write(self.keys, keys, start)
        _write(self.values, values, start)
        # The first new query needs the window - 1 positions before it.
        first = max(0, self.used - n_new - (self.window - 1))
        return _cut(self.keys, first, self.used), _cut(self.values, first, self.used)

    def _make_room(self, keys: Storage, values: Storage, n_new: int) -> None:
        capacity = 0 if self.keys is None else slots(self.keys)
        if self.used + n_new <= capacity:
            return
        full = self.window + self.slack
        if self.used + n_new <= full:  # short of the bound: grow in blocks, keeping every position
            keep, size = self.used, self.capacity(self.used + n_new)
        else:  # at the bound: keep the newest positions
            keep = min(self.used, self.window - 1 + self.slack // 2)
            size = max(full, keep + n_new)
        new_k, new_v = _zeros(keys, size), _zeros(values, size)
        if keep:
            assert self.keys is not None and self.values is not None
            _write(new_k, _cut(self.keys, self.used - keep, self.used), 0)
            _write(new_v, _cut(self.values, self.used - keep, self.used), 0)
        self.keys, self.values, self.used = new_k, new_v, keep

    def capacity(self, n: int) -> int:
        return min(self.window + self.slack, room(n, self.step)) if n <= self.window + self.slack else n

    def reserve(self, n_new: int) -> int:
        """Make room for ``n_new`` more positions; return the storage index of the first."""
        assert self.keys is not None and self.values is not None, "reserve() needs a filled cache"
        self._make_room(self.keys, self.values, n_new)
        return self.used

    def advance(self, keys: mx.array, values: mx.array, n_new: int) -> None:
        """Take the storage a :class:`DecodeSlot` wrote ``n_new`` positions into."""
        self.keys, self.values = keys, values
        self.used += n_new
        self.offset += n_new

    def make_mask(self, n_queries: int, pad: mx.array | None = None) -> mx.array | str | None:
        """Mask for the queries just added (call after :meth:`update_and_fetch`)."""
        n_keys = min(self.used, n_queries + self.window - 1)
        if pad is None and n_queries > 1 and n_keys <= self.window:
            return "causal"  # the last query sees every key: the window cuts nothing
        return self._mask(n_queries, n_keys, pad)

    def can_trim(self, n: int) -> bool:
        """Exact only while the window before the new end is still held."""
        if not 0 <= n <= self.offset:
            return False
        held_from = self.offset - self.used
        return held_from == 0 or n <= self.used - (self.window - 1)

    def trim(self, n: int) -> int:
        """Drop the last ``n`` positions (see :meth:`can_trim`); return how many."""
        if not self.can_trim(n):
            raise ValueError(f"cannot trim {n} positions: the window before them is no longer held")
        self.offset -= n
        self.used -= n
        return n

    @property
    def state(self) -> tuple[Storage, Storage] | tuple[()]:
        """The held (keys, values), oldest first; ``()`` when empty."""
        if self.keys is None or self.values is None or self.used == 0:
            return ()
        return _cut(self.keys, 0, self.used), _cut(self.values, 0, self.used)


class SlotIndex:
    """Where a compiled one-token decode step writes and reads in the caches of one window
    (every global layer's cache, or every sliding layer's: they move in step). Shared by their
    :class:`DecodeSlot` objects, so what the step derives from it is built once, not once a layer.

    Args:
        index: () int32, the storage slot of the new position (from ``reserve``).
        window: the sliding window, or None.
    """

    def __init__(self, index: mx.array, window: int | None) -> None:
        self.index = index
        self.window = window
        self.start = index.reshape(1)  # the write's start on the storage's position axis
        self._span: mx.array | None = None

    def span(self) -> mx.array:
        """(2,) int32 ``[first, end)``: the storage slots the new position's query sees (its own
        slot last; a sliding window's first ``window`` back)."""
        if self._span is None:
            end = self.index + 1
            first = mx.maximum(end - self.window, 0) if self.window is not None else mx.zeros_like(end)
            self._span = mx.stack([first, end]).astype(mx.int32)
        return self._span


class DecodeSlot:
    """A cache's stand-in inside a compiled one-token decode step.

    Every shape is fixed from step to step: the new keys/values are written at a traced
    storage index and attention runs over the cache's whole storage, either over the slots of
    :meth:`span` (one query a row, no padding: a kernel that takes the span reads only those) or
    with a mask that hides the slots not (or no longer) in use. The step's graph can then be
    compiled once and replayed, instead of being rebuilt op by op for every token. Masked slots
    add exactly nothing to the attention (their softmax weight is 0).

    Float caches only (the compiled step is not used with quantized ones).

    Args:
        keys, values: the cache's whole storage (B, n_kv, S, D).
        where: the write slot of this cache's window (:class:`SlotIndex`).
        position: () int32, the new position's absolute index (the RoPE offset).
    """

    def __init__(self, keys: mx.array, values: mx.array, where: SlotIndex, position: mx.array) -> None:
        self.keys, self.values = keys, values
        self.where = where
        self.offset = position

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Write (B, n_kv, 1, D) keys/values at the slot index; return the whole storage."""
        start = self.where.start
        self.keys = mx.slice_update(self.keys, keys, start, axes=(2,))
        self.values = mx.slice_update(self.values, values, start, axes=(2,))
        return self.keys, self.values

    def span(self) -> mx.array:
        """(2,) int32 ``[first, end)`` of the slots the new query sees (:meth:`SlotIndex.span`)."""
        return self.where.span()

    def make_mask(self, n_queries: int, pad: mx.array | None = None) -> mx.array:
        """(1 or B, 1, 1, S) mask: the slots of :meth:`span`, past the padding."""
        assert n_queries == 1, "DecodeSlot serves one-token steps"
        mask = span_mask(self.keys.shape[2], self.span())  # (1, 1, 1, S)
        if pad is not None:
            position = mx.arange(self.keys.shape[2]) + (self.offset - self.where.index)  # each slot's position
            mask = mask & (position[None, None, None] >= pad[:, None, None, None])  # (B, 1, 1, S)
        return mask


def trim_caches(caches: list[KVCache], n: int) -> bool:
    """Trim every cache by ``n`` if all can do it exactly; return whether they did."""
    if not all(c.can_trim(n) for c in caches):
        return False
    for c in caches:
        c.trim(n)
    return True

"""KV caches: objects with ``offset``, ``update_and_fetch``, ``make_mask``, ``state`` and ``trim``.

Both caches return keys/values in temporal order, the last key being position ``offset - 1``.
That single invariant lets one mask builder serve every layer, batch padding included.
"""

from __future__ import annotations

import mlx.core as mx


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
    """A growing cache: storage is allocated in steps of ``step`` positions."""

    step = 256
    window: int | None = None
    # Set by a caller for one step: caches of the same layout share the masks built for it.
    masks: dict | None = None

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append (B, n_kv, L, D) keys/values; return all cached ones, oldest first."""
        prev, n_new = self.offset, keys.shape[2]
        if self.keys is None or prev + n_new > self.keys.shape[2]:
            self._grow(keys, values, n_new)
        self.offset += n_new
        self.keys[..., prev : self.offset, :] = keys
        self.values[..., prev : self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def reserve(self, n_new: int) -> int:
        """Make room for ``n_new`` more positions (the cache must hold some); return the
        storage index the first of them will take. Used by :class:`DecodeSlot`."""
        assert self.keys is not None and self.values is not None, "reserve() needs a filled cache"
        if self.offset + n_new > self.keys.shape[2]:
            self._grow(self.keys, self.values, n_new)
        return self.offset

    def advance(self, keys: mx.array, values: mx.array, n_new: int) -> None:
        """Take the storage a :class:`DecodeSlot` wrote ``n_new`` positions into."""
        self.keys, self.values = keys, values
        self.offset += n_new

    def _grow(self, keys: mx.array, values: mx.array, n_new: int) -> None:
        batch, n_kv, _, k_dim = keys.shape
        size = ((n_new + self.step - 1) // self.step) * self.step
        new_k = mx.zeros((batch, n_kv, size, k_dim), keys.dtype)  # (B, n_kv, size, D)
        new_v = mx.zeros((batch, n_kv, size, values.shape[3]), values.dtype)
        if self.keys is None:
            self.keys, self.values = new_k, new_v
            return
        kept_k, kept_v = self.keys[..., : self.offset, :], self.values[..., : self.offset, :]
        self.keys = mx.concatenate([kept_k, new_k], axis=2)
        self.values = mx.concatenate([kept_v, new_v], axis=2)

    def make_mask(self, n_queries: int, pad: mx.array | None = None) -> mx.array | str | None:
        """Mask for the queries just added (call after :meth:`update_and_fetch`); ``"causal"``
        where a plain causal mask is exact (MLX's attention kernels then build none)."""
        if pad is None and n_queries > 1:
            return "causal"
        return self._mask(n_queries, self.offset, pad)

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
    def state(self) -> tuple[mx.array, mx.array] | tuple[()]:
        """The cached (keys, values), trimmed to ``offset``; ``()`` when empty."""
        if self.keys is None or self.offset == 0:
            return ()
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @property
    def nbytes(self) -> int:
        """Bytes held by the storage (allocated, not only used)."""
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class RotatingKVCache(KVCache):
    """Cache of a sliding-window layer: memory stays bounded by ``window + slack``.

    New positions are appended in temporal order; when the storage is full, the newest
    ``window - 1 + slack // 2`` positions are moved to the front (one copy every ~slack/2
    tokens). Keeping ``slack // 2`` positions beyond the window is what makes a small
    :meth:`trim` exact (the chat case: drop a few tokens, then prefill the new turn), and
    a multi-token chunk arriving after the window has wrapped still sees, for each of its
    queries, exactly the ``window`` positions before it.
    """

    def __init__(self, window: int, slack: int = 256) -> None:
        super().__init__()
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self.slack = slack
        self.used = 0  # positions held in storage; the oldest is offset - used

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append keys/values; return those the new queries can see, oldest first."""
        n_new = keys.shape[2]
        self._make_room(keys, values, n_new)
        start = self.used
        self.used += n_new
        self.offset += n_new
        self.keys[..., start : self.used, :] = keys
        self.values[..., start : self.used, :] = values
        # The first new query needs the window - 1 positions before it.
        first = max(0, self.used - n_new - (self.window - 1))
        return self.keys[..., first : self.used, :], self.values[..., first : self.used, :]

    def _make_room(self, keys: mx.array, values: mx.array, n_new: int) -> None:
        capacity = 0 if self.keys is None else self.keys.shape[2]
        if self.used + n_new > capacity:
            keep = min(self.used, self.window - 1 + self.slack // 2)
            size = max(self.window + self.slack, keep + n_new)
            batch, n_kv, _, k_dim = keys.shape
            new_k = mx.zeros((batch, n_kv, size, k_dim), keys.dtype)  # (B, n_kv, size, D)
            new_v = mx.zeros((batch, n_kv, size, values.shape[3]), values.dtype)
            if keep:
                new_k[..., :keep, :] = self.keys[..., self.used - keep : self.used, :]
                new_v[..., :keep, :] = self.values[..., self.used - keep : self.used, :]
            self.keys, self.values, self.used = new_k, new_v, keep

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
    def state(self) -> tuple[mx.array, mx.array] | tuple[()]:
        """The held (keys, values), oldest first; ``()`` when empty."""
        if self.keys is None or self.used == 0:
            return ()
        return self.keys[..., : self.used, :], self.values[..., : self.used, :]


class DecodeSlot:
    """A cache's stand-in inside a compiled one-token decode step.

    Every shape is fixed from step to step: the new keys/values are written at a traced
    storage ``index`` and attention runs over the cache's whole storage, with a mask that
    hides the slots not (or no longer) in use. The step's graph can then be compiled once
    and replayed, instead of being rebuilt op by op for every token. Masked slots add
    exactly nothing to the attention (their softmax weight is 0).

    Args:
        keys, values: the cache's whole storage (B, n_kv, S, D).
        index: () int32, the storage slot of the new position (from ``reserve``).
        position: () int32, the new position's absolute index (the RoPE offset).
        window: the sliding window, or None.
    """

    def __init__(
        self, keys: mx.array, values: mx.array, index: mx.array, position: mx.array, window: int | None
    ) -> None:
        self.keys, self.values = keys, values
        self.index = index
        self.offset = position
        self.window = window

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Write (B, n_kv, 1, D) keys/values at ``index``; return the whole storage."""
        start = self.index.reshape(1)
        self.keys = mx.slice_update(self.keys, keys, start, axes=(2,))
        self.values = mx.slice_update(self.values, values, start, axes=(2,))
        return self.keys, self.values

    def make_mask(self, n_queries: int, pad: mx.array | None = None) -> mx.array:
        """(1 or B, 1, 1, S) mask: slots up to ``index``, within the window, past the padding."""
        assert n_queries == 1, "DecodeSlot serves one-token steps"
        slots = mx.arange(self.keys.shape[2])
        mask = slots <= self.index
        if self.window is not None:
            mask = mask & (self.index - slots < self.window)
        mask = mask[None, None, None]  # (1, 1, 1, S)
        if pad is not None:
            position = slots + (self.offset - self.index)  # absolute position held in each slot
            mask = mask & (position[None, None, None] >= pad[:, None, None, None])  # (B, 1, 1, S)
        return mask


def trim_caches(caches: list[KVCache], n: int) -> bool:
    """Trim every cache by ``n`` if all can do it exactly; return whether they did."""
    if not all(c.can_trim(n) for c in caches):
        return False
    for c in caches:
        c.trim(n)
    return True

"""Memory statistics, limits and cache clearing (``lmx.runtime.memory``, public as ``lmx.memory``).

Thin, typed wrappers over MLX's allocator counters. Numbers are bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx

from lmx.errors import InvalidOptionError, OutOfMemoryError


@dataclass(frozen=True)
class MemoryStats:
    """A snapshot of MLX's allocator.

    Attributes:
        active: bytes held by live arrays.
        peak: the highest ``active`` since the last :func:`reset_peak`.
        cache: bytes kept by the allocator for reuse (freed arrays).
        limit: the memory limit in force.
    """

    active: int
    peak: int
    cache: int
    limit: int


def stats() -> MemoryStats:
    """Return the current :class:`MemoryStats`."""
    limit = mx.set_memory_limit(0)
    mx.set_memory_limit(limit)
    return MemoryStats(mx.get_active_memory(), mx.get_peak_memory(), mx.get_cache_memory(), limit)


def active() -> int:
    """Bytes held by live MLX arrays."""
    return mx.get_active_memory()


def peak() -> int:
    """Peak active bytes since the last :func:`reset_peak`."""
    return mx.get_peak_memory()


def reset_peak() -> None:
    """Start measuring the peak afresh."""
    mx.reset_peak_memory()


def clear_cache() -> None:
    """Return the allocator's cached (freed) buffers to the system."""
    mx.clear_cache()


def set_limit(nbytes: int) -> int:
    """Limit MLX's memory; an allocation beyond it raises :class:`OutOfMemoryError` in lmx.

    Args:
        nbytes: the limit in bytes (> 0).

    Returns:
        The previous limit.

    Raises:
        InvalidOptionError: nbytes is not a positive integer.
    """
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
        raise InvalidOptionError(f"memory limit must be a positive number of bytes, got {nbytes!r}")
    return mx.set_memory_limit(nbytes)


def check_allocation(nbytes: int, what: str) -> None:
    """Raise :class:`OutOfMemoryError` if allocating ``nbytes`` more would pass the limit.

    Args:
        nbytes: bytes about to be allocated.
        what: what the bytes are for, for the message.
    """
    limit = stats().limit
    have = mx.get_active_memory()
    if have + nbytes > limit:
        raise OutOfMemoryError(
            f"{what} needs {format_bytes(nbytes)} but only {format_bytes(max(0, limit - have))} of the {format_bytes(limit)} limit is free"
        )


def format_bytes(nbytes: int) -> str:
    """``nbytes`` for a message: "1.5 GiB", "12.0 KiB", "300 bytes"."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


def kv_cache_bytes(
    windows: Sequence[int | None],
    n_kv_heads: int,
    head_dim: int,
    n_tokens: int,
    itemsize: int,
    *,
    batch: int = 1,
    step: int = 256,
    bits: int | None = None,
    group_size: int = 64,
) -> int:
    """Bytes the keys and values of ``n_tokens`` positions take in a KV cache.

    Mirrors the caches of :mod:`lmx.models.cache`: a layer's storage grows in blocks of
    ``step`` positions; a sliding-window layer's stops at ``window + step`` (its slack is a
    block) and keeps that size.

    Args:
        windows: one entry per layer: its sliding window, or None for a global layer.
        n_kv_heads: key/value heads per layer.
        head_dim: size of one head.
        n_tokens: positions to hold (prompt plus generated tokens).
        itemsize: bytes per element (4 for float32, 2 for bfloat16); of a quantized cache's
            scales and biases.
        batch: rows in the batch.
        step: the caches' allocation block.
        bits: a quantized cache's bits per key/value element (None: float, ``itemsize`` each).
        group_size: a quantized cache's elements per scale and bias.

    Returns:
        The bytes, keys and values of every layer together.
    """
    blocks = room(n_tokens, step)
    if n_tokens <= 0:
        return 0
    positions = sum(blocks if w is None else min(blocks, w + step) for w in windows)
    return 2 * batch * n_kv_heads * kv_row_bytes(head_dim, itemsize, bits, group_size) * positions


def room(n: int, step: int) -> int:
    """``n`` positions rounded up to whole blocks of ``step``: what a KV cache allocates to hold them
    (:mod:`lmx.models.cache` allocates by it; :func:`kv_cache_bytes` counts by it)."""
    return -(-n // step) * step


def kv_row_bytes(head_dim: int, itemsize: int, bits: int | None = None, group_size: int = 64) -> int:
    """Bytes one position of one head takes in a KV cache (keys or values).

    Args:
        head_dim: size of one head.
        itemsize: bytes per float element (of a quantized cache's scales and biases).
        bits: a quantized cache's bits per element (None: float).
        group_size: a quantized cache's elements per scale and bias.
    """
    if bits is None:
        return head_dim * itemsize
    # packed values, then one scale and one bias per group (as mx.quantize lays them out)
    return head_dim * bits // 8 + 2 * (head_dim // group_size) * itemsize

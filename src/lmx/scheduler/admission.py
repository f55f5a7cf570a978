"""Admission by memory: what a batch's KV cache takes, and what the memory limit leaves free.

The scheduler starts a request only when the KV storage of the batch with it, to the last
token every row may still make, fits beside everything else MLX holds; the prefix cache
gives its memory back first. See :meth:`lmx.scheduler.Scheduler.submit`.
"""

from __future__ import annotations

from collections.abc import Sequence

from lmx.errors import OutOfMemoryError
from lmx.runtime import memory


class KVBudget:
    """KV-cache sizes for one model's cache layout.

    Args:
        windows: each layer's sliding window (None for a global layer).
        n_kv_heads, head_dim: the keys' and values' shape per position.
        itemsize: bytes per element (of the scales and biases, for quantized caches).
        bits, group_size: a quantized cache's bits per element and elements per scale (None: float).
    """

    def __init__(
        self,
        windows: Sequence[int | None],
        n_kv_heads: int,
        head_dim: int,
        itemsize: int,
        bits: int | None = None,
        group_size: int = 64,
    ) -> None:
        self.windows, self.n_kv_heads, self.head_dim, self.itemsize = list(windows), n_kv_heads, head_dim, itemsize
        self.bits, self.group_size = bits, group_size

    def bytes(self, positions: int, rows: int = 1) -> int:
        """Storage of ``rows`` rows of ``positions`` positions (as the caches allocate it)."""
        return memory.kv_cache_bytes(
            self.windows,
            self.n_kv_heads,
            self.head_dim,
            positions,
            self.itemsize,
            batch=rows,
            bits=self.bits,
            group_size=self.group_size,
        )

    def position_bytes(self) -> int:
        """Bytes one position of one row takes in every layer (keys and values)."""
        row = memory.kv_row_bytes(self.head_dim, self.itemsize, self.bits, self.group_size)
        return 2 * self.n_kv_heads * row * len(self.windows)

    @staticmethod
    def free(held: int = 0) -> int:
        """Bytes the memory limit leaves, counting ``held`` bytes (storage that would be
        replaced, or could be given back) as free."""
        return memory.stats().limit - memory.active() + held

    def refusal(self, positions: int, held: int = 0) -> OutOfMemoryError:
        """The error refusing a request whose cache of ``positions`` positions does not fit."""
        limit = memory.stats().limit
        return OutOfMemoryError(
            f"the KV cache for {positions} positions needs {memory.format_bytes(self.bytes(positions))} but only "
            f"{memory.format_bytes(max(0, self.free(held)))} of the {memory.format_bytes(limit)} limit is free "
            "(use a shorter prompt or a lower max_tokens)"
        )


__all__ = ["KVBudget"]

"""Images inside a prompt: where their soft tokens sit, their features, and the attention they get.

A multimodal model (Gemma 3) turns each image into a block of ``n`` soft tokens: the prompt holds
``n`` placeholder ids there, and the model's input at those positions is the image's features
instead of a token embedding. Queries inside one block see the whole block (bidirectional), as
transformers' Gemma 3 does; everything else stays causal (and within a sliding layer's window).

:class:`ImagePrompt` carries that for one request; :class:`BlockMaskCache` wraps a layer's KV
cache for one prefill chunk so that the layer's own mask gains the blocks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from lmx.models.cache import KVCache

# Prefix-cache keys of soft tokens are negative (never a vocabulary id): one per image digest and
# position in its block, so the same image reuses a cached prefix and a different one never does.
_KEY_SPAN = 1 << 12


def image_digest(pixels: np.ndarray) -> str:
    """A content digest of one image's preprocessed pixels (with its crops)."""
    return hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()


@dataclass
class ImagePrompt:
    """The images of one prompt.

    Attributes:
        starts: each block's first position in the prompt, ascending.
        features: (n_blocks, block_len, hidden) soft tokens, block ``i`` at ``starts[i]``.
        digests: one content digest per block (keys the prefix cache).
    """

    starts: list[int]
    features: mx.array
    digests: list[str]

    @property
    def block_len(self) -> int:
        return int(self.features.shape[1])

    def blocks(self) -> list[tuple[int, int]]:
        """(start, end) of each block."""
        return [(s, s + self.block_len) for s in self.starts]

    def cache_ids(self, ids: Sequence[int]) -> list[int]:
        """``ids`` with each soft token replaced by a key of its image's content and place."""
        out = list(ids)
        for (start, end), digest in zip(self.blocks(), self.digests):
            base = -(int(digest[:12], 16) * _KEY_SPAN) - 1
            for k, pos in enumerate(range(start, end)):
                out[pos] = base - k
        return out

    def chunk_end(self, start: int, end: int) -> int:
        """Where a prefill chunk from ``start`` wanting to stop at ``end`` may stop: never inside a
        block (its positions must see one another), so before the block, or after it when the
        chunk starts in it."""
        for b_start, b_end in self.blocks():
            if b_start < end < b_end:
                return b_start if b_start > start else b_end
        return end

    def embed(self, h: mx.array, start: int) -> mx.array:
        """The input (1, L, hidden) of the positions ``start .. start + L``: ``h`` (the token
        embeddings) with each soft token's position holding its image's feature."""
        length = h.shape[1]
        pieces, at = [], start
        for i, (b_start, b_end) in enumerate(self.blocks()):
            lo, hi = max(b_start, start), min(b_end, start + length)
            if lo >= hi:
                continue
            if lo > at:
                pieces.append(h[:, at - start : lo - start])
            pieces.append(self.features[i : i + 1, lo - b_start : hi - b_start].astype(h.dtype))
            at = hi
        if not pieces:
            return h
        if at < start + length:
            pieces.append(h[:, at - start :])
        return mx.concatenate(pieces, axis=1)  # (1, L, hidden)

    def touches(self, start: int, length: int) -> bool:
        """Whether any block overlaps positions ``start .. start + length``."""
        return any(b < start + length and e > start for b, e in self.blocks())


class BlockMaskCache:
    """A layer's KV cache for one prefill chunk whose mask lets each image block see itself.

    The mask is (causal or same block) and within the sliding window, as transformers'
    ``create_masks_for_vision_model`` builds it; writes go to the wrapped cache.
    """

    def __init__(self, cache: KVCache, blocks: Sequence[tuple[int, int]]) -> None:
        self.cache = cache
        self.blocks = blocks
        self.window = cache.window
        self.quant = cache.quant  # attention reads a quantized cache's triples with its layout

    @property
    def offset(self) -> int:
        return self.cache.offset

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return self.cache.update_and_fetch(keys, values)

    def make_mask(self, n_queries: int, pad: mx.array | None = None) -> mx.array | str | None:
        assert pad is None, "a prompt with images is prefilled alone, unpadded"
        offset = self.cache.offset
        n_keys = (
            offset if self.window is None else min(getattr(self.cache, "used", offset), n_queries + self.window - 1)
        )
        q = np.arange(offset - n_queries, offset)[:, None]
        k = np.arange(offset - n_keys, offset)[None, :]
        q_block = np.full(q.shape, -1)
        k_block = np.full(k.shape, -2)
        for i, (s, e) in enumerate(self.blocks):
            q_block[(q >= s) & (q < e)] = i
            k_block[(k >= s) & (k < e)] = i
        mask = (k <= q) | (q_block == k_block)
        if self.window is not None:
            mask &= q - k < self.window
        return mx.array(mask)[None, None]  # (1, 1, Lq, Lk)

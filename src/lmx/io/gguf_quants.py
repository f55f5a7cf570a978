"""Dequantize GGML tensor blocks to float32 with vectorised numpy.

Each kernel turns a ``(n_blocks, type_size)`` uint8 array into ``(n_blocks, block_size)`` float32
values, following the reference ``dequantize_row_*`` functions of ggml (``ggml-quants.c``) in the
same float operation order, so results equal ``gguf.quants.dequantize`` bit for bit. Tensors are
processed in chunks of blocks so temporaries stay in cache; chunks can run on a thread pool (numpy
releases the GIL in these ufuncs). Types without a kernel here (IQ*, TQ*, MXFP4...) are handed to
``gguf.quants.dequantize``, which is vectorised numpy as well.

All byte layouts are little-endian, as GGUF files are.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Executor

import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from lmx.errors import WeightsError

T = GGMLQuantizationType
F16 = np.dtype("<f2")
# Elements per chunk: the output (1 MiB of float32) and its temporaries stay in L2.
CHUNK_ELEMENTS = 1 << 18
_SHIFT_0_4 = np.array([0, 4], dtype=np.uint8)
_SHIFT_2BIT = np.array([0, 2, 4, 6], dtype=np.uint8)


def _half(blocks: np.ndarray, start: int) -> np.ndarray:
    """One fp16 field per block at byte ``start`` -> ``(n_blocks, 1)`` float32."""
    return blocks[:, start : start + 2].view(F16).astype(np.float32)


def _nibbles(qs: np.ndarray, groups: int) -> np.ndarray:
    """Bytes ``(nb, groups * 32)`` -> ``(nb, groups * 2, 32)``: each group's 32 low nibbles, then its high ones."""
    nb = qs.shape[0]
    q = qs.reshape(nb, groups, 1, 32) >> _SHIFT_0_4.reshape(1, 1, 2, 1)  # (nb, groups, 2, 32)
    return (q & 0xF).reshape(nb, groups * 2, 32)


def _bit_planes(bits: np.ndarray) -> np.ndarray:
    """Bytes ``(nb, 32)`` -> ``(nb, 8, 32)``: plane ``i`` holds bit ``i`` of every byte."""
    planes = np.unpackbits(bits.reshape(bits.shape[0], 32, 1), axis=2, bitorder="little")  # (nb, 32, 8)
    return planes.transpose(0, 2, 1)


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 packed bytes of Q4_K/Q5_K -> eight 6-bit scales and eight 6-bit mins (ggml's get_scale_min_k4)."""
    s0, s1, s2 = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([s0 & 63, (s2 & 0xF) | ((s0 >> 6) << 4)], axis=1)
    mn = np.concatenate([s1 & 63, (s2 >> 4) | ((s1 >> 6) << 4)], axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _split_nibbles16(qs: np.ndarray) -> np.ndarray:
    """Bytes ``(nb, 16)`` -> ``(nb, 32)`` uint8: element ``j`` is the low nibble of byte ``j``, ``j + 16`` the high one."""
    q = qs.reshape(qs.shape[0], 1, 16) >> _SHIFT_0_4.reshape(1, 2, 1)  # (nb, 2, 16)
    return (q & 0xF).reshape(qs.shape[0], 32)


def _dq_q4_0(blocks: np.ndarray) -> np.ndarray:
    q = _split_nibbles16(blocks[:, 2:18]).view(np.int8) - np.int8(8)
    return _half(blocks, 0) * q


def _dq_q4_1(blocks: np.ndarray) -> np.ndarray:
    q = _split_nibbles16(blocks[:, 4:20])
    return _half(blocks, 0) * q + _half(blocks, 2)


def _q5_values(blocks: np.ndarray, qh_at: int) -> np.ndarray:
    """Q5_0/Q5_1 5-bit values: bit ``j`` of the 32-bit ``qh`` is the fifth bit of element ``j``."""
    high = np.unpackbits(blocks[:, qh_at : qh_at + 4], axis=1, bitorder="little")  # (nb, 32)
    return _split_nibbles16(blocks[:, qh_at + 4 : qh_at + 20]) | (high << 4)


def _dq_q5_0(blocks: np.ndarray) -> np.ndarray:
    q = _q5_values(blocks, 2).view(np.int8) - np.int8(16)
    return _half(blocks, 0) * q


def _dq_q5_1(blocks: np.ndarray) -> np.ndarray:
    return _half(blocks, 0) * _q5_values(blocks, 4) + _half(blocks, 2)


def _dq_q8_0(blocks: np.ndarray) -> np.ndarray:
    return _half(blocks, 0) * blocks[:, 2:34].view(np.int8)


def _dq_q2_k(blocks: np.ndarray) -> np.ndarray:
    nb = blocks.shape[0]
    scales, qs = blocks[:, 0:16], blocks[:, 16:80]
    dl = (_half(blocks, 80) * (scales & 0xF)).reshape(nb, 16, 1)
    ml = (_half(blocks, 82) * (scales >> 4)).reshape(nb, 16, 1)
    # output element n*128 + j*32 + l takes bits 2j of byte 32n + l; 16 elements share a scale
    q = (qs.reshape(nb, 2, 1, 32) >> _SHIFT_2BIT.reshape(1, 1, 4, 1)) & 3  # (nb, 2, 4, 32)
    return (dl * q.reshape(nb, 16, 16) - ml).reshape(nb, 256)


def _dq_q3_k(blocks: np.ndarray) -> np.ndarray:
    nb = blocks.shape[0]
    hmask, qs, s = blocks[:, 0:32], blocks[:, 32:96], blocks[:, 96:108]
    # sixteen 6-bit scales: low nibbles in bytes 0..7 (low then high halves), top two bits in bytes 8..11
    low = np.concatenate([s[:, 0:8] & 0xF, s[:, 0:8] >> 4], axis=1)
    high = ((s[:, 8:12].reshape(nb, 1, 4) >> _SHIFT_2BIT.reshape(1, 4, 1)) & 3).reshape(nb, 16)
    scale = (low | (high << 4)).view(np.int8) - np.int8(32)
    dl = (_half(blocks, 108) * scale).reshape(nb, 16, 1)
    q = (qs.reshape(nb, 2, 1, 32) >> _SHIFT_2BIT.reshape(1, 1, 4, 1)) & 3  # (nb, 2, 4, 32)
    # the hmask bit (n*4 + j) of byte l is set when element n*128 + j*32 + l does NOT subtract 4
    hbit = _bit_planes(hmask).reshape(nb, 2, 4, 32)
    values = q.view(np.int8) - ((hbit ^ 1) << 2).view(np.int8)
    return (dl * values.reshape(nb, 16, 16)).reshape(nb, 256)


def _dq_q4_k(blocks: np.ndarray) -> np.ndarray:
    nb = blocks.shape[0]
    sc, mn = _k_scale_min(blocks[:, 4:16])
    d = (_half(blocks, 0) * sc).reshape(nb, 8, 1)
    m = (_half(blocks, 2) * mn).reshape(nb, 8, 1)
    return (d * _nibbles(blocks[:, 16:144], 4) - m).reshape(nb, 256)


def _dq_q5_k(blocks: np.ndarray) -> np.ndarray:
    nb = blocks.shape[0]
    sc, mn = _k_scale_min(blocks[:, 4:16])
    d = (_half(blocks, 0) * sc).reshape(nb, 8, 1)
    m = (_half(blocks, 2) * mn).reshape(nb, 8, 1)
    # sub-block s takes its fifth bits from bit s of the 32 qh bytes
    q = _nibbles(blocks[:, 48:176], 4) | (_bit_planes(blocks[:, 16:48]) << 4)
    return (d * q - m).reshape(nb, 256)


def _q6_k_scales(blocks: np.ndarray) -> np.ndarray:
    """Q6_K's 16 int8 sub-block scales (bytes 192..207 of a block), ``(n_blocks, 16)``."""
    return blocks[:, 192:208].view(np.int8)


def _q6_k_values(blocks: np.ndarray) -> np.ndarray:
    """Q6_K's signed 6-bit values ``q - 32`` in element order, ``(n_blocks, 16, 16)`` int8 (one row per
    sub-block of 16, each with its scale in :func:`_q6_k_scales`)."""
    nb = blocks.shape[0]
    ql, qh = blocks[:, 0:128], blocks[:, 128:192]
    # per 128-element half: rows are ql[0:32] & 15, ql[32:64] & 15, ql[0:32] >> 4, ql[32:64] >> 4
    low = ((ql.reshape(nb, 2, 1, 64) >> _SHIFT_0_4.reshape(1, 1, 2, 1)) & 0xF).reshape(nb, 2, 4, 32)
    high = (qh.reshape(nb, 2, 1, 32) >> _SHIFT_2BIT.reshape(1, 1, 4, 1)) & 3  # (nb, 2, 4, 32)
    return ((low | (high << 4)).view(np.int8) - np.int8(32)).reshape(nb, 16, 16)


def _dq_q6_k(blocks: np.ndarray) -> np.ndarray:
    nb = blocks.shape[0]
    d = (_half(blocks, 208) * _q6_k_scales(blocks)).reshape(nb, 16, 1)
    return (d * _q6_k_values(blocks)).reshape(nb, 256)


def _dq_q8_k(blocks: np.ndarray) -> np.ndarray:
    return blocks[:, 0:4].view("<f4") * blocks[:, 4:260].view(np.int8)


def _dq_bf16(blocks: np.ndarray) -> np.ndarray:
    return (blocks.view("<u2").astype(np.uint32) << 16).view(np.float32)


def _cast(dtype: str) -> Callable[[np.ndarray], np.ndarray]:
    def kernel(blocks: np.ndarray) -> np.ndarray:
        return blocks.view(dtype).astype(np.float32)

    return kernel


KERNELS: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    T.F32: _cast("<f4"),
    T.F16: _cast("<f2"),
    T.BF16: _dq_bf16,
    T.F64: _cast("<f8"),
    T.I8: _cast("i1"),
    T.I16: _cast("<i2"),
    T.I32: _cast("<i4"),
    T.I64: _cast("<i8"),
    T.Q4_0: _dq_q4_0,
    T.Q4_1: _dq_q4_1,
    T.Q5_0: _dq_q5_0,
    T.Q5_1: _dq_q5_1,
    T.Q8_0: _dq_q8_0,
    T.Q2_K: _dq_q2_k,
    T.Q3_K: _dq_q3_k,
    T.Q4_K: _dq_q4_k,
    T.Q5_K: _dq_q5_k,
    T.Q6_K: _dq_q6_k,
    T.Q8_K: _dq_q8_k,
}


def type_name(ggml_type: int) -> str:
    """``Q4_K`` for 12; ``type 99`` for an id the gguf package does not know."""
    try:
        return T(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


def _gguf_can_dequantize(ggml_type: int) -> bool:
    # gguf keeps one class per type it can dequantize in this table (private, hence the getattr)
    traits = getattr(gguf_quants, "_type_traits", {})
    return ggml_type in traits


def is_supported(ggml_type: int) -> bool:
    """Whether tensors of ``ggml_type`` can be dequantized (by a kernel here or by gguf)."""
    return ggml_type in KERNELS or (ggml_type in GGML_QUANT_SIZES and _gguf_can_dequantize(ggml_type))


def block_geometry(ggml_type: int) -> tuple[int, int]:
    """``(elements per block, bytes per block)``.

    Raises:
        WeightsError: the type id is unknown.
    """
    try:
        return GGML_QUANT_SIZES[T(ggml_type)]
    except (ValueError, KeyError):
        known = ", ".join(t.name for t in GGML_QUANT_SIZES)
        raise WeightsError(f"unknown GGML tensor type {ggml_type}; known types: {known}") from None


def _each_chunk(run: Callable[[int], None], starts: range, executor: Executor | None) -> None:
    """``run(start)`` for every chunk start, on ``executor``'s threads when there are several."""
    if executor is not None and len(starts) > 1:
        for future in [executor.submit(run, s) for s in starts]:
            future.result()
    else:
        for s in starts:
            run(s)


def dequantize(
    raw: np.ndarray,
    ggml_type: int,
    n_elements: int,
    *,
    out: np.ndarray | None = None,
    executor: Executor | None = None,
) -> np.ndarray:
    """Dequantize one tensor's bytes to a flat float32 array.

    Args:
        raw: the tensor's bytes, a 1-D uint8 array (may be a read-only memory map).
        ggml_type: the GGML type id (``gguf.GGMLQuantizationType``).
        n_elements: the number of values the bytes hold.
        out: a writable, C-contiguous float32 array of ``n_elements`` values to fill (say, the
            memory of an MLX array); a new one is made when None.
        executor: when given, chunks are dequantized on it in parallel.

    Returns:
        ``out`` (flattened), or a new array: never a view of ``raw``.

    Raises:
        WeightsError: the type is unknown or unsupported, or the byte count does not match.
    """
    block, size = block_geometry(ggml_type)
    if n_elements % block or raw.size != n_elements // block * size:
        raise WeightsError(
            f"{type_name(ggml_type)} tensor of {n_elements} values needs {n_elements // block * size} bytes "
            f"in blocks of {block}, got {raw.size}"
        )
    if out is None:
        out = np.empty(n_elements, dtype=np.float32)
    elif out.dtype != np.float32 or out.size != n_elements or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"out must be a writable C-contiguous float32 array of {n_elements} values")
    blocks = raw.reshape(-1, size)
    flat = out.reshape(-1)
    kernel = KERNELS.get(ggml_type)
    if kernel is None:
        if not is_supported(ggml_type):
            raise WeightsError(f"cannot dequantize GGML type {type_name(ggml_type)}: no kernel here or in gguf")
        try:
            flat[:] = gguf_quants.dequantize(blocks, T(ggml_type)).reshape(-1)
        except (ValueError, NotImplementedError, TypeError, IndexError) as e:
            raise WeightsError(f"cannot dequantize GGML type {type_name(ggml_type)}: {e}") from e
        return flat
    rows = flat.reshape(-1, block)
    step = max(1, CHUNK_ELEMENTS // block)

    def run(start: int) -> None:
        # a corrupt scale (inf, NaN) gives NaNs; that is the data, not an error to report
        with np.errstate(invalid="ignore", over="ignore"):
            rows[start : start + step] = kernel(blocks[start : start + step])

    _each_chunk(run, range(0, blocks.shape[0], step), executor)
    return flat


# ---------------------------------------------------------------------------------------------------------------
# MLX's affine layout (``mx.quantize``): the blocks re-expressed, not re-quantized.
#
# MLX holds a matrix as unsigned ``bits``-bit integers ``u`` packed in uint32 words, with one
# ``scale`` and one ``bias`` per group of ``group_size`` values of a row: ``w = scale * u + bias``.
# Every type below is ``w = d * q + m`` per 32 values with ``q`` a small integer, so it maps exactly:
# Q8_0 ``d * q`` -> ``u = q + 128``, bias ``-128 d``; Q4_0/Q5_0 ``d * (q - 8|16)`` -> ``u = q``, bias
# ``-8|16 d``; Q4_1/Q5_1 ``d * q + m``; Q4_K/Q5_K sub-blocks of 32: scale ``d * sc``, bias
# ``-dmin * m``. In float32 the scales and biases are exact (an fp16 times an integer of at most 8 bits)
# and ``scale * u + bias`` rounds as the reference dequantization does.
#
# Q6_K is the one inexact type (:data:`AFFINE_INEXACT`): its sub-blocks of 16 each carry an int8 scale,
# MLX's smallest group is 32, and one common scale for two sub-blocks would need 13-bit integers
# (``sc * (q - 32)`` spans -4064..4096). It is re-quantized to 8 bits: per group of 32 the step is a
# quarter of the coarser sub-block's (``d * max|sc| / 4``), so that sub-block's values are exact
# (``4 (q - 32)``, 253 levels) and the other's are rounded to the nearest quarter step: each value is
# within ``d * max|sc| / 8`` of the file's, an eighth of the coarser sub-block's own Q6_K step. (A group
# whose values span all 257 quarter steps, two sub-blocks of opposite scales both reaching ``q = 0``,
# has 256 levels: its top value is one quarter step off.)

AFFINE_GROUP_SIZE = 32
AFFINE_BITS: dict[int, int] = {
    T.Q8_0: 8,
    T.Q4_0: 4,
    T.Q4_1: 4,
    T.Q5_0: 5,
    T.Q5_1: 5,
    T.Q4_K: 4,
    T.Q5_K: 5,
    T.Q6_K: 8,
}
AFFINE_INEXACT = frozenset({T.Q6_K})  # re-quantized, not re-expressed (see above)


def _af_q8_0(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = _half(blocks, 0)
    return blocks[:, 2:34] ^ np.uint8(0x80), d, d * np.float32(-128)  # q + 128 (two's complement)


def _af_q4_0(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = _half(blocks, 0)
    return _split_nibbles16(blocks[:, 2:18]), d, d * np.float32(-8)


def _af_q4_1(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _split_nibbles16(blocks[:, 4:20]), _half(blocks, 0), _half(blocks, 2)


def _af_q5_0(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = _half(blocks, 0)
    return _q5_values(blocks, 2), d, d * np.float32(-16)


def _af_q5_1(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _q5_values(blocks, 4), _half(blocks, 0), _half(blocks, 2)


def _af_q4_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    nb = blocks.shape[0]
    sc, mn = _k_scale_min(blocks[:, 4:16])
    return _nibbles(blocks[:, 16:144], 4).reshape(nb, 256), _half(blocks, 0) * sc, -(_half(blocks, 2) * mn)


def _af_q5_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    nb = blocks.shape[0]
    sc, mn = _k_scale_min(blocks[:, 4:16])
    q = _nibbles(blocks[:, 48:176], 4) | (_bit_planes(blocks[:, 16:48]) << 4)
    return q.reshape(nb, 256), _half(blocks, 0) * sc, -(_half(blocks, 2) * mn)


def _af_q6_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    nb = blocks.shape[0]
    q = _q6_k_values(blocks).reshape(nb, 8, 2, 16).astype(np.int32)  # groups of 32: two sub-blocks each
    sc = _q6_k_scales(blocks).astype(np.int32).reshape(nb, 8, 2, 1)
    big = np.abs(sc).max(axis=2)  # (nb, 8, 1): the coarser sub-block's |scale|
    # each value in quarter steps of the coarser sub-block: 4 sc q / big, an integer in -128..128
    t = np.rint((4 * sc * q) / np.maximum(big, 1)[:, :, None]).astype(np.int32).reshape(nb, 8, 32)
    lo, hi = t.min(axis=2, keepdims=True), t.max(axis=2, keepdims=True)
    # the offset that makes them 0..255; a group spanning all 257 (both extremes) loses its top one
    offset = np.where(hi - lo <= 255, -lo, 128)
    u = np.clip(t + offset, 0, 255).astype(np.uint8).reshape(nb, 256)
    scale = _half(blocks, 208) * (big.reshape(nb, 8).astype(np.float32) / np.float32(4))
    return u, scale, -offset.reshape(nb, 8).astype(np.float32) * scale


_AFFINE: dict[int, Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]] = {
    T.Q8_0: _af_q8_0,
    T.Q4_0: _af_q4_0,
    T.Q4_1: _af_q4_1,
    T.Q5_0: _af_q5_0,
    T.Q5_1: _af_q5_1,
    T.Q4_K: _af_q4_k,
    T.Q5_K: _af_q5_k,
    T.Q6_K: _af_q6_k,
}


def affine_widths(affine: Mapping[int, int] | Collection[int]) -> dict[int, int]:
    """GGML type -> packed width: a mapping as given, else each type's own width (:data:`AFFINE_BITS`);
    types without an affine form are left out."""
    if isinstance(affine, Mapping):
        return {t: bits for t, bits in affine.items() if t in AFFINE_BITS}
    return {t: AFFINE_BITS[t] for t in affine if t in AFFINE_BITS}


def affine_name(bits: int, ggml_type: int | None = None) -> str:
    """How MLX's affine form of ``bits`` is named in reports: ``"mlx affine q4 g32"``; a type of
    :data:`AFFINE_INEXACT` adds ``", requantized"``."""
    name = f"mlx affine q{bits} g{AFFINE_GROUP_SIZE}"
    return name + ", requantized" if ggml_type in AFFINE_INEXACT else name


def pack_bits(u: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned ``bits``-bit integers ``(rows, cols)`` (uint8, ``cols`` a multiple of 32) -> MLX's packed
    uint32 ``(rows, cols * bits / 32)``: a little-endian bit stream, value ``j`` at bits ``j*bits``."""
    rows, cols = u.shape
    if bits == 8:
        return np.ascontiguousarray(u, dtype=np.uint8).view(np.uint32)
    if bits == 4:
        pairs = u.reshape(rows, cols // 2, 2)
        return np.ascontiguousarray(pairs[:, :, 0] | (pairs[:, :, 1] << 4)).view(np.uint32)
    eights = u.reshape(-1, 8).astype(np.uint64) << (np.arange(8, dtype=np.uint64) * np.uint64(bits))
    words = np.bitwise_or.reduce(eights, axis=1)  # 8 values in the low 8*bits bits of a uint64
    stream = words.view(np.uint8).reshape(-1, 8)[:, :bits]  # little-endian: keep the low bytes
    return np.ascontiguousarray(stream).reshape(rows, cols * bits // 8).view(np.uint32)


def to_affine(
    raw: np.ndarray,
    ggml_type: int,
    shape: tuple[int, int],
    bits: int | None = None,
    *,
    executor: Executor | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One matrix's blocks in MLX's affine layout: exactly for the types of :data:`AFFINE_BITS` but Q6_K
    (:data:`AFFINE_INEXACT`), whose values come within an eighth of their coarser sub-block's step (see above).

    Args:
        raw: the tensor's bytes, 1-D uint8.
        ggml_type: a type of :data:`AFFINE_BITS`.
        shape: ``(rows, cols)``.
        bits: the packed width: None for the type's own (:data:`AFFINE_BITS`), or a wider one up to
            8 (the same integers, scales and biases, for a device without products of that width).
        executor: when given, chunks of rows are converted on it in parallel.

    Returns:
        ``(weight, scales, biases)``: uint32 ``(rows, cols * bits / 32)`` and float32
        ``(rows, cols / 32)`` twice, for ``mx.dequantize(..., group_size=32, bits=bits)``.

    Raises:
        WeightsError: the type has no affine form, ``bits`` is narrower than the type's or
            over 8, or the byte count does not match.
    """
    native = AFFINE_BITS.get(ggml_type)
    if native is None:
        allowed = ", ".join(type_name(t) for t in AFFINE_BITS)
        raise WeightsError(f"GGML type {type_name(ggml_type)} has no MLX affine form; types that do: {allowed}")
    bits = native if bits is None else bits
    if not native <= bits <= 8:
        raise WeightsError(f"{type_name(ggml_type)} needs {native} to 8 bits in MLX's affine form, got {bits}")
    rows, cols = shape
    block, size = block_geometry(ggml_type)
    if cols % block or raw.size != rows * cols // block * size:
        raise WeightsError(
            f"{type_name(ggml_type)} matrix {rows}x{cols} needs {rows * cols // block * size} bytes "
            f"in blocks of {block}, got {raw.size}"
        )
    blocks = raw.reshape(rows, cols // block, size)
    weight = np.empty((rows, cols * bits // 32), dtype=np.uint32)
    scales = np.empty((rows, cols // AFFINE_GROUP_SIZE), dtype=np.float32)
    biases = np.empty_like(scales)
    step = max(1, CHUNK_ELEMENTS // cols)

    def run(start: int) -> None:
        chunk = blocks[start : start + step]
        n = chunk.shape[0]
        with np.errstate(invalid="ignore", over="ignore"):
            u, s, b = _AFFINE[ggml_type](chunk.reshape(-1, size))
        weight[start : start + n] = pack_bits(u.reshape(n, cols), bits)
        scales[start : start + n] = s.reshape(n, -1)
        biases[start : start + n] = b.reshape(n, -1)

    _each_chunk(run, range(0, rows, step), executor)
    return weight, scales, biases


def dequantize_to_mlx(
    raw: np.ndarray, ggml_type: int, shape: tuple[int, ...], *, executor: Executor | None = None
) -> mx.array:
    """Dequantize one tensor straight into the memory of a new float32 MLX array of ``shape``.

    On the CPU, writing through a numpy view of the array (``np.array(a, copy=False)``, which MLX
    documents as writable) saves a full copy of every weight over ``mx.array(numpy_values)``; the
    array is new, so nothing else sees it change. On a GPU, or where MLX gives no such view, the
    values are copied in.

    Raises:
        WeightsError: as :func:`dequantize`.
    """
    n = math.prod(shape)
    if n == 0 or mx.default_device().type != mx.cpu:
        return mx.array(dequantize(raw, ggml_type, n, executor=executor).reshape(shape))
    array = mx.zeros(shape, dtype=mx.float32)
    mx.eval(array)
    try:
        view = np.array(array, copy=False)
    except (ValueError, TypeError):
        view = None
    if (
        view is None
        or view.shape != shape
        or view.flags.owndata
        or not (view.flags.c_contiguous and view.flags.writeable)
    ):
        return mx.array(dequantize(raw, ggml_type, n, executor=executor).reshape(shape))
    dequantize(raw, ggml_type, n, out=view, executor=executor)
    return array

"""Parse a GGUF file's header (llama.cpp's format): every metadata key/value and every tensor's place.

The header is parsed here rather than by ``gguf.GGUFReader`` so that every inconsistency (truncation,
counts larger than the file, offsets past its end, unknown types, repeated names) is reported as a
:class:`~lmx.errors.WeightsError` naming the problem, and so that the 262k-token vocabulary of a
Gemma file parses in a fraction of a second.

Layout (little-endian): magic ``GGUF``, u32 version (2 or 3), u64 tensor count, u64 key/value count,
the key/values, then per tensor its name, u32 n_dims, u64 dims (fastest-varying first), u32 GGML type
and u64 offset into the data section, which starts at the next multiple of ``general.alignment``.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmx.errors import ModelNotFoundError, WeightsError
from lmx.io import gguf_quants

MAGIC = b"GGUF"
MAX_DIMS = 4  # GGML_MAX_DIMS

# GGUF metadata value types -> struct format (scalars); 7 is bool, 8 string, 9 array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 10: "Q", 11: "q", 12: "d", 7: "?"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor's entry in the header."""

    name: str
    shape: tuple[int, ...]  # numpy order: the GGUF dims reversed, so a Linear weight is (out, in)
    ggml_type: int
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


@dataclass
class GGUFHeader:
    """A parsed GGUF header: every metadata key/value and every tensor's location."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]
    alignment: int
    data_offset: int


class _Cursor:
    """Bounds-checked little-endian reads from the memory-mapped file."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise WeightsError(
                f"{self.path}: truncated or corrupt GGUF: {what} needs {n} bytes at offset {self.pos}, "
                f"but the file has {self.size} bytes"
            )

    def scalar(self, fmt: str, what: str) -> Any:
        n = struct.calcsize("<" + fmt)
        self.need(n, what)
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str) -> str:
        return self.strings(1, what)[0]

    def strings(self, n: int, what: str) -> list[str]:
        """``n`` length-prefixed UTF-8 strings (the vocabulary's hot loop, hence the inlined bounds checks)."""
        buf, pos, size, unpack = self.buf, self.pos, self.size, _U64.unpack_from
        out: list[str] = []
        for i in range(n):
            label = what if n == 1 else f"{what}[{i}]"
            if pos + 8 > size:
                self.pos = pos
                self.need(8, label)
            (length,) = unpack(buf, pos)
            if pos + 8 + length > size:
                self.pos = pos + 8
                self.need(length, label)
            try:
                out.append(buf[pos + 8 : pos + 8 + length].decode("utf-8"))
            except UnicodeDecodeError as e:
                raise WeightsError(f"{self.path}: {label} is not valid UTF-8 ({e})") from e
            pos += 8 + length
        self.pos = pos
        return out

    def count(self, per_item: int, what: str) -> int:
        """A u64 count of items that each take at least ``per_item`` bytes: must fit in the rest of the file."""
        n = self.scalar("Q", what)
        if n * per_item > self.size - self.pos:
            raise WeightsError(
                f"{self.path}: corrupt GGUF: header claims {n} {what}, more than the "
                f"{self.size - self.pos} remaining bytes can hold"
            )
        return n

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        """One metadata value; an array's elements are untagged values of its element type."""
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype != _ARRAY:
            raise WeightsError(f"{self.path}: corrupt GGUF: {what} has unknown value type {vtype}")
        if depth >= 4:
            raise WeightsError(f"{self.path}: corrupt GGUF: {what} nests arrays more than 4 deep")
        etype = self.scalar("I", f"the element type of {what}")
        if etype in _SCALARS:
            fmt = "<" + _SCALARS[etype]
            size = struct.calcsize(fmt)
            n = self.count(size, f"elements in {what}")
            raw = self.buf[self.pos : self.pos + n * size]  # bytes, a copy: no view pins the map
            self.pos += n * size
            return np.frombuffer(raw, dtype=np.dtype(fmt)).tolist()
        if etype == _STRING:
            return self.strings(self.count(8, f"elements in {what}"), what)
        if etype == _ARRAY:
            n = self.count(12, f"elements in {what}")
            return [self.value(_ARRAY, f"{what}[{i}]", depth + 1) for i in range(n)]
        raise WeightsError(f"{self.path}: corrupt GGUF: {what} has unknown element type {etype}")


def _open_map(path: Path) -> mmap.mmap:
    if not path.is_file():
        raise ModelNotFoundError(f"GGUF file {path} not found")
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise WeightsError(f"{path} is empty, not a GGUF file")
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise WeightsError(f"cannot read {path}: {e}") from e


def read_header(path: str | os.PathLike) -> GGUFHeader:
    """Parse and validate a GGUF file's header (no tensor data is read).

    Raises:
        ModelNotFoundError: no such file.
        WeightsError: the file is not GGUF, is truncated, or its header is inconsistent.
    """
    path = Path(path)
    buf = _open_map(path)
    try:
        return _parse(_Cursor(buf, path))
    finally:
        buf.close()


def _parse(cur: _Cursor) -> GGUFHeader:
    path = cur.path
    cur.need(4, "the magic number")
    if cur.buf[:4] != MAGIC:
        raise WeightsError(f"{path} is not a GGUF file: magic is {cur.buf[:4]!r}, expected {MAGIC!r}")
    cur.pos = 4
    version = cur.scalar("I", "the version")
    if version not in (2, 3):
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        hint = " (a big-endian file, which is not supported)" if swapped in (2, 3) else ""
        raise WeightsError(f"{path}: unsupported GGUF version {version}{hint}; supported: 2, 3")
    n_tensors = cur.count(24, "tensors")  # name length, n_dims, type and offset at least
    n_kv = cur.count(13, "metadata keys")  # key length, value type and a 1-byte value at least
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        if key in metadata:
            raise WeightsError(f"{path}: corrupt GGUF: metadata key {key!r} appears twice")
        metadata[key] = cur.value(cur.scalar("I", f"the type of {key}"), key)
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise WeightsError(f"{path}: general.alignment must be a power of two, got {alignment!r}")
    infos = []
    for i in range(n_tensors):
        name = cur.string(f"the name of tensor #{i}")
        n_dims = cur.scalar("I", f"the dimension count of {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise WeightsError(f"{path}: tensor {name!r} has {n_dims} dimensions; GGUF allows 1 to {MAX_DIMS}")
        dims = [cur.scalar("Q", f"the shape of {name}") for _ in range(n_dims)]
        infos.append((name, dims, cur.scalar("I", f"the type of {name}"), cur.scalar("Q", f"the offset of {name}")))
    data_offset = -(-cur.pos // alignment) * alignment
    tensors: dict[str, GGUFTensorInfo] = {}
    for name, dims, ggml_type, offset in infos:
        if name in tensors:
            raise WeightsError(f"{path}: corrupt GGUF: tensor {name!r} appears twice")
        tensors[name] = _tensor_info(path, name, dims, ggml_type, offset, data_offset, cur.size, alignment)
    _check_disjoint(path, tensors.values())
    return GGUFHeader(path, version, metadata, tensors, alignment, data_offset)


def _check_disjoint(path: Path, infos: Collection[GGUFTensorInfo]) -> None:
    """Raise if two tensors' data ranges share a byte: GGUF lays tensors out one after another,
    so an overlap means a corrupt or crafted file whose weights silently alias each other."""
    previous: GGUFTensorInfo | None = None
    for info in sorted((i for i in infos if i.nbytes), key=lambda i: (i.offset, i.nbytes)):
        if previous is not None and info.offset < previous.offset + previous.nbytes:
            raise WeightsError(
                f"{path}: corrupt GGUF: tensors {previous.name!r} (bytes {previous.offset} to "
                f"{previous.offset + previous.nbytes}) and {info.name!r} (bytes {info.offset} to "
                f"{info.offset + info.nbytes}) overlap; each tensor needs its own data"
            )
        if previous is None or info.offset + info.nbytes > previous.offset + previous.nbytes:
            previous = info


def _tensor_info(
    path: Path, name: str, dims: list[int], ggml_type: int, offset: int, data_offset: int, size: int, alignment: int
) -> GGUFTensorInfo:
    try:
        block, type_size = gguf_quants.block_geometry(ggml_type)
    except WeightsError as e:
        raise WeightsError(f"{path}: tensor {name!r}: {e}") from None
    if dims[0] % block:
        raise WeightsError(
            f"{path}: tensor {name!r} has rows of {dims[0]} values, not a multiple of the "
            f"{gguf_quants.type_name(ggml_type)} block size {block}"
        )
    n = math.prod(dims)
    nbytes = n // block * type_size
    start = data_offset + offset
    if offset % alignment or start + nbytes > size:
        raise WeightsError(
            f"{path}: tensor {name!r} ({nbytes} bytes at data offset {offset}) lies outside the file "
            f"({size} bytes, data from {data_offset}) or is not {alignment}-byte aligned"
        )
    return GGUFTensorInfo(name, tuple(int(d) for d in reversed(dims)), ggml_type, start, nbytes)


def file_type_name(header: GGUFHeader) -> str | None:
    """llama.cpp's name for the file's quantization mix (``general.file_type``): ``Q4_K_M``, ``F32``...;
    None when the file does not say."""
    from gguf import LlamaFileType

    value = header.metadata.get("general.file_type")
    if not isinstance(value, int):
        return None
    try:
        return LlamaFileType(value).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return f"file type {value}"


def tensor_type_counts(header: GGUFHeader) -> dict[str, int]:
    """How many tensors of each GGML type the file holds (``{"Q4_K": 108, "F32": 163, ...}``), most first."""
    counts: dict[str, int] = {}
    for info in header.tensors.values():
        name = gguf_quants.type_name(info.ggml_type)
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def info_metadata(header: GGUFHeader) -> dict[str, Any]:
    """The scalar metadata (arrays such as the vocabulary left out), plus the format version and tensor count."""
    scalars = {k: v for k, v in header.metadata.items() if not isinstance(v, list)}
    return {**scalars, "GGUF.version": header.version, "GGUF.tensor_count": len(header.tensors)}


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """A GGUF file's scalar metadata, for ``lmx info`` (see :func:`info_metadata`); no tensor is read.

    Raises:
        ModelNotFoundError, WeightsError: as :func:`read_header`.
    """
    return info_metadata(read_header(path))


__all__ = [
    "GGUFHeader",
    "GGUFTensorInfo",
    "file_type_name",
    "info_metadata",
    "read_gguf_metadata",
    "read_header",
    "tensor_type_counts",
]

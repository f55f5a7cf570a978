"""Read GGUF files (llama.cpp's format): metadata -> HF config, tensors -> HF-named float arrays.

The header is parsed here rather than by ``gguf.GGUFReader`` so that every inconsistency (truncation,
counts larger than the file, offsets past its end, unknown types, repeated names) is reported as a
:class:`~lmx.errors.WeightsError` naming the problem, and so that the 262k-token vocabulary of a
Gemma file parses in a fraction of a second. Tensor bytes are memory-mapped and dequantized by
:mod:`lmx.io.gguf_quants`. The vocabulary stays metadata here: the loading wing builds the tokenizer
from it (:func:`lmx.tokenizer.gguf.tokenizer_from_gguf`), so ``io/`` imports no tokenizer.

Layout (little-endian): magic ``GGUF``, u32 version (2 or 3), u64 tensor count, u64 key/value count,
the key/values, then per tensor its name, u32 n_dims, u64 dims (fastest-varying first), u32 GGML type
and u64 offset into the data section, which starts at the next multiple of ``general.alignment``.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import re
import struct
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from lmx.errors import ModelNotFoundError, UnsupportedModelError, WeightsError
from lmx.io import gguf_quants

logger = logging.getLogger(__name__)

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


@dataclass
class GGUFModel:
    """Everything a GGUF file holds, in Hugging Face terms."""

    config: dict[str, Any]
    weights: dict[str, mx.array]
    header: GGUFHeader  # every metadata key, the vocabulary (tokenizer.ggml.*) included
    metadata: dict[str, Any] = field(default_factory=dict)
    block_types: dict[str, int] = field(default_factory=dict)  # HF name -> GGML type of weights kept as blocks
    affine_types: dict[str, int] = field(default_factory=dict)  # HF name -> GGML type of weights in MLX affine form
    affine_bits: dict[str, int] = field(default_factory=dict)  # HF name -> the packed width of those weights


@dataclass(frozen=True)
class GGUFArchitecture:
    """How one architecture's GGUF file maps onto its Hugging Face checkpoint.

    Each ``models/<arch>.py`` declares one (its ``GGUF``); the loading wing hands them to
    :func:`read_gguf`, so this module carries no per-architecture branch.

    Attributes:
        name: the file's ``general.architecture`` (e.g. gemma3).
        model_type: the HF ``model_type`` it loads as.
        layer_names: per-layer GGUF tensor names (``blk.N.<name>``) beyond the common ones, and their HF names.
        norm_offset: subtracted from every norm weight (llama.cpp stores Gemma's as ``1 + w``: 1.0).
        rope_theta: ``rope_theta`` when the file has no ``rope.freq_base``.
        config: extra HF config keys from the metadata: ``config(metadata, base_config) -> dict``.
        permuted_qk: llama.cpp interleaved each head's two rotary halves of Q/K (llama): undo it.
        skipped: tensors left out, with a warning (llama's precomputed RoPE factors).
    """

    name: str
    model_type: str
    layer_names: Mapping[str, str] = field(default_factory=dict)
    norm_offset: float = 0.0
    rope_theta: float = 1e4
    config: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None
    permuted_qk: bool = False
    skipped: frozenset[str] = frozenset()


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


# ---------------------------------------------------------------------------------------------- config


def meta(md: dict[str, Any], arch: str, key: str, default: Any = None, *, required: bool = False) -> Any:
    """The metadata value ``{arch}.{key}``, else ``default``.

    Raises:
        WeightsError: it is missing and ``required``.
    """
    full = f"{arch}.{key}"
    if full in md:
        return md[full]
    if required:
        raise WeightsError(f"GGUF metadata lacks {full!r}, which a {arch} model needs")
    return default


def positive(md: dict[str, Any], arch: str, key: str, default: Any = None, *, integer: bool = True) -> Any:
    """A required (when ``default`` is None) positive int, or positive finite float, metadata value."""
    value = meta(md, arch, key, default, required=default is None)
    ok = isinstance(value, int) if integer else isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or isinstance(value, bool) or value <= 0:
        kind = "a positive integer" if integer else "a positive number"
        raise WeightsError(f"GGUF metadata {arch}.{key} must be {kind}, got {value!r}")
    return value if integer else float(value)


def _rope_scaling(md: dict[str, Any], arch: str) -> dict[str, Any] | None:
    kind = meta(md, arch, "rope.scaling.type")
    factor = meta(md, arch, "rope.scaling.factor")
    if kind in (None, "none") or factor in (None, 1.0):
        return None
    scaling: dict[str, Any] = {"rope_type": kind, "factor": positive(md, arch, "rope.scaling.factor", integer=False)}
    if meta(md, arch, "rope.scaling.original_context_length") is not None:
        scaling["original_max_position_embeddings"] = positive(md, arch, "rope.scaling.original_context_length")
    return scaling


def architecture_of(header: GGUFHeader, architectures: Mapping[str, GGUFArchitecture]) -> GGUFArchitecture:
    """The declaration of the file's ``general.architecture``.

    Raises:
        UnsupportedModelError: none of ``architectures`` is the file's.
    """
    arch = header.metadata.get("general.architecture")
    if not isinstance(arch, str) or arch not in architectures:
        raise UnsupportedModelError(
            f"{header.path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(architectures))}"
        )
    return architectures[arch]


def gguf_config(header: GGUFHeader, architectures: Mapping[str, GGUFArchitecture]) -> dict[str, Any]:
    """The HF ``config.json`` dict a GGUF file's metadata describes.

    Args:
        header: the parsed file.
        architectures: the architectures to read (``lmx.models.GGUF_ARCHITECTURES``), by GGUF name.

    Raises:
        UnsupportedModelError: the architecture is not one of ``architectures``.
        WeightsError: a required key is missing or has a bad value.
    """
    md = header.metadata
    spec = architecture_of(header, architectures)
    arch = spec.name
    hidden = positive(md, arch, "embedding_length")
    heads = positive(md, arch, "attention.head_count")
    head_dim = meta(md, arch, "attention.key_length") or meta(md, arch, "rope.dimension_count") or hidden // heads
    if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim <= 0:
        raise WeightsError(f"GGUF metadata {arch}.attention.key_length must be a positive integer, got {head_dim!r}")
    embed = header.tensors.get("token_embd.weight")
    tokens = md.get("tokenizer.ggml.tokens")
    tokens = tokens if isinstance(tokens, list) else []
    config: dict[str, Any] = {
        "model_type": spec.model_type,
        "vocab_size": embed.shape[0] if embed is not None else positive(md, arch, "vocab_size", len(tokens)),
        "hidden_size": hidden,
        "intermediate_size": positive(md, arch, "feed_forward_length"),
        "num_hidden_layers": positive(md, arch, "block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": positive(md, arch, "attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": positive(md, arch, "attention.layer_norm_rms_epsilon", 1e-6, integer=False),
        "max_position_embeddings": positive(md, arch, "context_length"),
        # llama.cpp writes the output projection only when it is not the embedding matrix
        "tie_word_embeddings": "output.weight" not in header.tensors,
        "rope_theta": positive(md, arch, "rope.freq_base", spec.rope_theta, integer=False),
        "attention_bias": "blk.0.attn_q.bias" in header.tensors,
        "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": md.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": md.get("tokenizer.ggml.padding_token_id"),
    }
    if (scaling := _rope_scaling(md, arch)) is not None:
        config["rope_scaling"] = scaling
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if meta(md, arch, key) is not None:
            config[key] = positive(md, arch, key, integer=False)
    if spec.config is not None:
        config.update(spec.config(md, config))
    return config


# --------------------------------------------------------------------------------------------- weights

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_name(gguf_name: str, spec: GGUFArchitecture) -> str | None:
    """The HF tensor name for a GGUF one (``blk.0.attn_q.weight`` -> ``model.layers.0.self_attn.q_proj.weight``)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m is None:
        return None
    part = _LAYER_NAMES.get(m[2]) or spec.layer_names.get(m[2])
    return f"model.layers.{m[1]}.{part}.{m[3]}" if part else None


def gguf_names(spec: GGUFArchitecture, n_layers: int) -> dict[str, str]:
    """HF tensor name -> GGUF tensor name for every tensor a model of ``n_layers`` layers may have
    (the inverse of :func:`hf_name`)."""
    out = {hf: g for g, hf in _GLOBAL_NAMES.items()}
    parts = {**_LAYER_NAMES, **spec.layer_names}
    for i in range(n_layers):
        for part, hf_part in parts.items():
            for suffix in ("weight", "bias"):
                out[f"model.layers.{i}.{hf_part}.{suffix}"] = f"blk.{i}.{part}.{suffix}"
    return out


def _unpermute(w: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's Q/K row order for llama (it interleaves each head's two rotary halves)."""
    rows, rest = w.shape[0], w.shape[1:]
    if rows % (2 * n_heads):
        raise WeightsError(f"a llama Q/K projection of {rows} rows does not split into {n_heads} heads")
    w = w.reshape(n_heads, rows // n_heads // 2, 2, *rest)  # (heads, head_dim/2, 2, ...)
    return w.swapaxes(1, 2).reshape(rows, *rest)  # (heads * 2 * head_dim/2, ...)


def _fix(w: mx.array, gguf_name: str, spec: GGUFArchitecture, config: dict[str, Any]) -> mx.array:
    if spec.norm_offset and gguf_name.endswith("norm.weight"):
        return w - spec.norm_offset
    if spec.permuted_qk and gguf_name.endswith(("attn_q.weight", "attn_q.bias")):
        return _unpermute(w, config["num_attention_heads"])
    if spec.permuted_qk and gguf_name.endswith(("attn_k.weight", "attn_k.bias")):
        return _unpermute(w, config["num_key_value_heads"])
    return w


def kept_blocks(header: GGUFHeader, keep: Collection[int], spec: GGUFArchitecture) -> dict[str, int]:
    """HF name -> GGML type of the matrices whose quantized blocks are to be kept as they are.

    Those are the 2-D weights (Linear layers, the embedding) whose type is in ``keep``; norms and
    1-D tensors are always dequantized.
    """
    out = {}
    for info in header.tensors.values():
        name = hf_name(info.name, spec)
        if name and info.ggml_type in keep and len(info.shape) == 2 and not info.name.endswith("norm.weight"):
            out[name] = info.ggml_type
    return out


def load_weights(
    header: GGUFHeader,
    config: dict[str, Any],
    spec: GGUFArchitecture,
    *,
    dtype: mx.Dtype = mx.float32,
    threads: int | None = None,
    keep_blocks: Collection[int] = (),
    affine: Mapping[int, int] | Collection[int] = (),
    select: Callable[[str, mx.array], mx.array] | None = None,
    keep: Callable[[str], bool] | None = None,
) -> dict[str, mx.array]:
    """Dequantize every tensor of ``header``'s file into HF-named arrays of ``dtype``.

    Args:
        keep_blocks: GGML types to keep quantized: such matrices (see :func:`kept_blocks`) come back
            as their raw bytes, uint8 of shape (rows, bytes per row), for :mod:`lmx.kernels`.
        affine: GGML types (of :data:`lmx.io.gguf_quants.AFFINE_BITS`) whose matrices come back in
            MLX's affine layout, exactly: ``<name>.weight`` packed uint32, ``<name>.scales`` and
            ``<name>.biases`` in ``dtype`` (groups of 32; see :func:`lmx.io.gguf_quants.to_affine`);
            a mapping gives each type's packed width (see :func:`lmx.io.gguf_quants.affine_widths`).

    Raises:
        WeightsError: a tensor has no HF name, an unsupported type, or bad bytes.
    """
    raw_names = set(kept_blocks(header, keep_blocks, spec))
    widths = gguf_quants.affine_widths(affine)
    affine_names = set(kept_blocks(header, widths, spec)) - raw_names
    names = {}
    for info in header.tensors.values():
        if info.name in spec.skipped:
            logger.warning("%s: ignoring %s (%s declares it skipped)", header.path, info.name, spec.name)
            continue
        name = hf_name(info.name, spec)
        if name is None:
            raise WeightsError(f"{header.path}: GGUF tensor {info.name!r} has no {spec.name} counterpart")
        if keep is not None and not keep(name):
            continue  # another rank's (pipeline parallel): never read
        names[info.name] = name
    weights: dict[str, mx.array] = {}
    data = np.memmap(header.path, dtype=np.uint8, mode="r")
    workers = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for gguf_name, name in names.items():
            info = header.tensors[gguf_name]
            raw = data[info.offset : info.offset + info.nbytes]
            if name in affine_names:
                for suffix, part in zip(
                    ("weight", "scales", "biases"),
                    gguf_quants.to_affine(raw, info.ggml_type, info.shape, widths[info.ggml_type], executor=pool),
                    strict=True,
                ):
                    array = _fix(mx.array(part), gguf_name, spec, config)  # a row permutation applies to all three
                    key = name.removesuffix("weight") + suffix
                    weights[key] = array if suffix == "weight" or dtype == mx.float32 else array.astype(dtype)
                    mx.eval(weights[key])
                continue
            if name in raw_names:
                # the file's rows as they are (a copy: no view pins the map); a row permutation
                # (llama's Q/K order) applies to whole rows, so _fix works on them unchanged
                array = mx.array(np.array(raw).reshape(info.shape[0], -1))
            else:
                array = gguf_quants.dequantize_to_mlx(raw, info.ggml_type, info.shape, executor=pool)
            array = _fix(array, gguf_name, spec, config)
            if select is not None and name not in raw_names:
                array = select(name, array)
            weights[name] = array if dtype == mx.float32 or name in raw_names else array.astype(dtype)
            mx.eval(weights[name])  # materialize now, so an intermediate float32 copy can go
    del data
    return weights


def read_gguf_tensors(path: str | os.PathLike, dtype: mx.Dtype = mx.float32) -> tuple[GGUFHeader, dict[str, mx.array]]:
    """Every tensor of a GGUF file, dequantized, under the file's own names (a file that is no
    text model, such as llama.cpp's ``mmproj`` vision tower: the caller maps the names).

    Raises:
        ModelNotFoundError: no such file.
        WeightsError: the file is corrupt or a tensor cannot be read.
    """
    header = read_header(path)
    data = np.memmap(header.path, dtype=np.uint8, mode="r")
    tensors: dict[str, mx.array] = {}
    for info in header.tensors.values():
        raw = data[info.offset : info.offset + info.nbytes]
        array = gguf_quants.dequantize_to_mlx(raw, info.ggml_type, info.shape)
        tensors[info.name] = array if dtype == mx.float32 else array.astype(dtype)
        mx.eval(tensors[info.name])
    del data
    return header, tensors


def read_gguf(
    path: str | os.PathLike,
    architectures: Mapping[str, GGUFArchitecture],
    *,
    dtype: mx.Dtype = mx.float32,
    keep_blocks: Collection[int] = (),
    affine: Mapping[int, int] | Collection[int] = (),
    select: Callable[[str, mx.array], mx.array] | None = None,
    keep: Callable[[str], bool] | None = None,
) -> GGUFModel:
    """Read a GGUF model: its config, dequantized weights and metadata (the vocabulary is in ``header``).

    Args:
        path: the ``.gguf`` file.
        architectures: the architectures to read (``lmx.models.GGUF_ARCHITECTURES``), by GGUF name.
        dtype: the weights' dtype (dequantization is done in float32, then cast).
        keep_blocks: GGML types whose matrices stay as raw blocks (see :func:`load_weights`); the
            model's ``block_types`` names them.
        affine: GGML types whose matrices come in MLX's affine layout (see :func:`load_weights`);
            the model's ``affine_types`` names them.
        select: see :func:`load_weights`.
        keep: for a tensor's HF name, whether to read it at all (None: every tensor).

    Returns:
        A :class:`GGUFModel` in Hugging Face terms.

    Raises:
        ModelNotFoundError: no such file.
        UnsupportedModelError: the architecture is not one of ``architectures``.
        WeightsError: the file is corrupt or a tensor cannot be read.
    """
    header = read_header(path)
    spec = architecture_of(header, architectures)
    config = gguf_config(header, architectures)
    weights = load_weights(
        header, config, spec, dtype=dtype, keep_blocks=keep_blocks, affine=affine, select=select, keep=keep
    )
    blocks = kept_blocks(header, keep_blocks, spec)
    widths = gguf_quants.affine_widths(affine)
    affine_types = {k: t for k, t in kept_blocks(header, widths, spec).items() if k not in blocks}
    return GGUFModel(
        config=config,
        weights=weights,
        header=header,
        metadata=info_metadata(header),
        block_types=blocks,
        affine_types=affine_types,
        affine_bits={k: widths[t] for k, t in affine_types.items()},
    )


__all__ = [
    "GGUFArchitecture",
    "GGUFHeader",
    "GGUFModel",
    "GGUFTensorInfo",
    "architecture_of",
    "gguf_config",
    "gguf_names",
    "hf_name",
    "info_metadata",
    "kept_blocks",
    "load_weights",
    "meta",
    "positive",
    "read_gguf",
    "read_gguf_metadata",
    "read_gguf_tensors",
    "read_header",
]

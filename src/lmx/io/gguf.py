"""Read GGUF files (llama.cpp's format): metadata -> HF config, tensors -> HF-named float arrays.

The header is parsed by :mod:`lmx.io.gguf_header` (its names are re-exported here). Tensor bytes are
memory-mapped and dequantized by :mod:`lmx.io.gguf_quants`. The vocabulary stays metadata here: the
loading wing builds the tokenizer from it (:func:`lmx.tokenizer.gguf.tokenizer_from_gguf`), so ``io/``
imports no tokenizer.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from lmx.errors import UnsupportedModelError, WeightsError
from lmx.io import gguf_quants
from lmx.io.gguf_header import (
    GGUFHeader,
    GGUFTensorInfo,
    file_type_name,
    info_metadata,
    read_gguf_metadata,
    read_header,
    tensor_type_counts,
)

logger = logging.getLogger(__name__)


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
            MLX's affine layout (exactly; Q6_K re-quantized): ``<name>.weight`` packed uint32, ``<name>.scales`` and
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
    "file_type_name",
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
    "tensor_type_counts",
]

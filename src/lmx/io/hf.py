"""Hugging Face model directories: config.json, (sharded) safetensors, generation_config.json."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from lmx.errors import ConfigError, ModelNotFoundError, WeightsError


def read_json(path: Path, *, required: bool = True) -> dict[str, Any]:
    """Read a JSON object from ``path``.

    Raises:
        ModelNotFoundError: the file is required and missing.
        ConfigError: the file is not a JSON object.
    """
    if not path.is_file():
        if required:
            raise ModelNotFoundError(f"{path} not found")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model dir, from the shard index when there is one.

    Raises:
        ModelNotFoundError: no safetensors file, or a shard named by the index is missing.
    """
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise WeightsError(f"{index} has no 'weight_map' object")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ModelNotFoundError(f"{index} names shards that are missing: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"no *.safetensors weights in {model_dir}")
    return files


# safetensors dtype -> bytes per element, for the dtypes MLX loads as what they are. MLX
# reads F8_E4M3 as raw uint8 (a silently wrong model) and cannot read F64: both are refused.
SAFETENSORS_DTYPES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
}
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit on the JSON header
_MAX_DIM = 2**31 - 1  # MLX array dimensions are int32


@dataclass(frozen=True)
class SafetensorsEntry:
    """One tensor's entry in a safetensors header (offsets are absolute file positions)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


def read_safetensors_header(path: Path) -> dict[str, SafetensorsEntry]:
    """Parse and check a safetensors file's header, reading no tensor data.

    MLX's own reader accepts negative, fractional and overflowing shapes and repeated
    names, so every entry is checked here first: known dtype, a shape of non-negative
    integers, offsets that lie inside the file and cover exactly the tensor's bytes.

    Raises:
        ModelNotFoundError: no such file.
        WeightsError: the header is truncated, longer than the file, not a JSON object,
            or has a bad entry (the message names the file and the tensor).
    """
    if not path.is_file():
        raise ModelNotFoundError(f"{path} not found")
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            prefix = f.read(8)
            if len(prefix) < 8:
                raise WeightsError(f"{path}: truncated safetensors file: {size} bytes, the header length alone needs 8")
            (n,) = struct.unpack("<Q", prefix)
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise WeightsError(
                    f"{path}: corrupt or truncated safetensors file: header length {n} is larger than "
                    f"the {size - 8} bytes after it (or the format's limit of {MAX_HEADER_BYTES})"
                )
            raw = f.read(n)
    except OSError as e:
        raise WeightsError(f"cannot read {path}: {e}") from e
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_repeated_keys)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise WeightsError(f"{path}: the safetensors header is not valid JSON: {e}") from e
    except _RepeatedKeyError as e:
        raise WeightsError(f"{path}: the safetensors header names {e.args[0]!r} twice") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: the safetensors header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise WeightsError(f"{path}: safetensors __metadata__ must map strings to strings, got {metadata!r:.80}")
    data_start = 8 + n
    return {name: _entry(path, name, info, data_start, size) for name, info in header.items()}


class _RepeatedKeyError(Exception):
    pass


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _RepeatedKeyError(key)
        out[key] = value
    return out


def _entry(path: Path, name: str, info: Any, data_start: int, size: int) -> SafetensorsEntry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise WeightsError(f"{where}: entry must be an object with dtype, shape and data_offsets, got {info!r:.80}")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in SAFETENSORS_DTYPES:
        raise WeightsError(f"{where} has dtype {dtype!r}; supported: {', '.join(SAFETENSORS_DTYPES)}")
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d <= _MAX_DIM for d in shape):
        raise WeightsError(f"{where} has shape {shape!r:.80}; expected a list of integers in [0, {_MAX_DIM}]")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
        raise WeightsError(f"{where} has data_offsets {offsets!r:.80}; expected [begin, end] of integers >= 0")
    begin, end = offsets
    nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
    if end - begin != nbytes:
        raise WeightsError(
            f"{where} has data_offsets [{begin}, {end}] ({end - begin} bytes), but its {dtype} shape "
            f"{tuple(shape)} needs {nbytes} bytes"
        )
    if data_start + end > size:
        raise WeightsError(
            f"{where}: data_offsets [{begin}, {end}] lie outside the file ({size} bytes, data from byte "
            f"{data_start}); is the file truncated?"
        )
    return SafetensorsEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def safetensors_nbytes(files: list[Path], dtype: mx.Dtype | None = None) -> int:
    """Bytes the tensors of ``files`` take once loaded (floating ones cast to ``dtype``).

    Raises:
        WeightsError: as :func:`read_safetensors_header`.
    """
    total = 0
    for path in files:
        for entry in read_safetensors_header(path).values():
            itemsize = SAFETENSORS_DTYPES[entry.dtype]
            if dtype is not None and entry.dtype in ("F16", "BF16", "F32"):
                itemsize = dtype.size
            total += entry.n_elements * itemsize
    return total


# safetensors dtypes read by slice straight from the file (numpy holds bfloat16 as its bits)
_NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}

# One tensor's slice to read: (axis, start, stop); None reads it whole.
SliceOf = Callable[[str], "tuple[int, int, int] | None"]


def read_safetensors(
    files: list[Path], slice_of: SliceOf | None = None, keep: Callable[[str], bool] | None = None
) -> dict[str, mx.array]:
    """Load tensors from safetensors files (never pickle); a name in two files is an error.

    Each header is checked by :func:`read_safetensors_header` before MLX reads the file.

    Args:
        files: the files.
        slice_of: for a tensor's name, the part of it to read, ``(axis, start, stop)``, or None
            for all of it. A sliced float tensor is read from the file by its slice alone (the
            rest of it never enters memory): a rank of a tensor-parallel run holds only its part.
        keep: for a tensor's name, whether to read it at all (None: every tensor); a rank of a
            pipeline-parallel run reads only its layers' tensors.

    Raises:
        WeightsError: a file is corrupt or truncated, or two files hold the same tensor.
    """
    weights: dict[str, mx.array] = {}
    for path in files:
        entries = read_safetensors_header(path)
        try:
            part = mx.load(str(path), format="safetensors")
        except (RuntimeError, ValueError, OSError) as e:
            raise WeightsError(f"cannot read {path}: {e}") from e
        if keep is not None:
            part = {name: array for name, array in part.items() if keep(name)}  # the others are never evaluated
        dup = sorted(set(part) & set(weights))
        if dup:
            raise WeightsError(f"{path} repeats tensor(s) already loaded: {', '.join(dup[:5])}")
        for name, entry in entries.items():
            if name not in part:
                continue
            where = None if slice_of is None else slice_of(name)
            if where is not None:
                part[name] = _read_slice(path, entry, where, part[name])
        weights.update(part)
    return weights


def _read_slice(path: Path, entry: SafetensorsEntry, where: tuple[int, int, int], lazy: mx.array) -> mx.array:
    """``entry[start:stop]`` along ``axis``, read from the file alone (a float tensor), else cut
    from MLX's whole read (``lazy``) as its own copy."""
    axis, start, stop = where
    if not 0 <= axis < len(entry.shape) or not 0 <= start < stop <= entry.shape[axis]:
        raise WeightsError(f"{path}: cannot take [{start}, {stop}) of axis {axis} of {entry.name} {entry.shape}")
    index: list[Any] = [slice(None)] * len(entry.shape)
    index[axis] = slice(start, stop)
    if entry.dtype not in _NUMPY_DTYPES:
        out = mx.contiguous(lazy[tuple(index)])
        mx.eval(out)
        return out
    mapped = np.memmap(path, dtype=_NUMPY_DTYPES[entry.dtype], mode="r", offset=entry.start, shape=entry.shape)
    out = mx.array(np.ascontiguousarray(mapped[tuple(index)]))
    del mapped
    return out.view(mx.bfloat16) if entry.dtype == "BF16" else out


def quantization_of(config: dict[str, Any], source: str = "config.json") -> dict[str, int] | None:
    """MLX affine quantization settings (``group_size``, ``bits``) from a config, if any.

    Raises:
        ConfigError: the settings are not integer ``group_size`` and ``bits`` (``source`` names the file).
    """
    q = config.get("quantization") or config.get("quantization_config")
    if not q:
        return None
    try:
        return {"group_size": int(q["group_size"]), "bits": int(q["bits"])}
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{source}: quantization settings need integer group_size and bits, got {q!r}") from e


def apply_weights(model: nn.Module, weights: dict[str, mx.array], source: str, dtype: mx.Dtype | None = None) -> None:
    """Load ``weights`` into ``model`` strictly, casting floating tensors to ``dtype``.

    Quantized layers must already be quantized (see :func:`quantize_like`).

    Raises:
        WeightsError: a tensor is missing, unexpected, mis-shaped, of the wrong kind of dtype
            (an integer tensor for a float parameter) or holds NaN/infinity; the message names it.
    """
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing tensor(s): {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        problems.append(f"unexpected tensor(s): {', '.join(unexpected[:8])}" + (" ..." if len(unexpected) > 8 else ""))
    for name in sorted(set(expected) & set(weights)):
        want, have = expected[name], weights[name]
        if tuple(want.shape) != tuple(have.shape):
            problems.append(f"tensor {name} has shape {tuple(have.shape)}, expected {tuple(want.shape)}")
        elif mx.issubdtype(want.dtype, mx.floating) != mx.issubdtype(have.dtype, mx.floating) or (
            not mx.issubdtype(want.dtype, mx.floating) and want.dtype != have.dtype
        ):
            # an integer tensor where a float one belongs loads without complaint and gives garbage
            kind = "a floating-point dtype" if mx.issubdtype(want.dtype, mx.floating) else _dtype_name(want.dtype)
            problems.append(f"tensor {name} has dtype {_dtype_name(have.dtype)}, expected {kind}")
    if problems:
        raise WeightsError(f"{source}: " + "; ".join(problems[:4]))
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    check_finite(weights, source)
    model.update(tree_unflatten(list(weights.items())))


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")


def check_finite(weights: dict[str, mx.array], source: str) -> None:
    """Read every tensor and refuse floating ones holding NaN or infinity.

    One such value turns every output of the model into NaN, so it is an error at load
    time rather than a mystery at generation time. The tensors are materialised here
    (the caller would do so next anyway); a file MLX cannot read fails here too.

    Raises:
        WeightsError: naming the first tensors with non-finite values, or an unreadable file.
    """
    names = sorted(k for k, v in weights.items() if mx.issubdtype(v.dtype, mx.floating) and v.size)
    # max and min propagate NaN and show +-inf: two plain reductions, no tensor-sized temporary
    # (isfinite(w).any() was 4x slower on the CPU).
    extremes = [mx.stack([weights[k].max(), weights[k].min()]).astype(mx.float32) for k in names]
    finite = mx.isfinite(mx.stack(extremes)).all(axis=1) if names else mx.array([], dtype=mx.bool_)
    try:
        mx.eval(finite, list(weights.values()))
    except RuntimeError as e:
        raise WeightsError(f"{source}: cannot read the tensor data: {e}") from e
    bad = [name for name, ok in zip(names, finite.tolist()) if not ok]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise WeightsError(
            f"{source}: tensor(s) {shown} hold NaN or infinite values; the checkpoint is corrupt "
            "(every output of the model would be NaN)"
        )


def quantize_like(model: nn.Module, weights: dict[str, mx.array], settings: dict[str, int]) -> None:
    """Quantize exactly the layers whose ``.scales`` the checkpoint holds."""
    nn.quantize(
        model,
        group_size=settings["group_size"],
        bits=settings["bits"],
        class_predicate=lambda path, _module: f"{path}.scales" in weights,
    )

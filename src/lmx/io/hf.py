"""Hugging Face model directories: config.json, (sharded) safetensors, generation_config.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
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


def read_safetensors(files: list[Path]) -> dict[str, mx.array]:
    """Load tensors from safetensors files (never pickle); a name in two files is an error.

    Raises:
        WeightsError: a file is corrupt or truncated, or two files hold the same tensor.
    """
    weights: dict[str, mx.array] = {}
    for path in files:
        try:
            part = mx.load(str(path), format="safetensors")
        except (RuntimeError, ValueError, OSError) as e:
            raise WeightsError(f"cannot read {path}: {e}") from e
        dup = sorted(set(part) & set(weights))
        if dup:
            raise WeightsError(f"{path} repeats tensor(s) already loaded: {', '.join(dup[:5])}")
        weights.update(part)
    return weights


def quantization_of(config: dict[str, Any]) -> dict[str, int] | None:
    """MLX affine quantization settings (``group_size``, ``bits``) from a config, if any."""
    q = config.get("quantization") or config.get("quantization_config")
    if not q:
        return None
    try:
        return {"group_size": int(q["group_size"]), "bits": int(q["bits"])}
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"quantization settings need integer group_size and bits, got {q!r}") from e


def apply_weights(model: nn.Module, weights: dict[str, mx.array], source: str, dtype: mx.Dtype | None = None) -> None:
    """Load ``weights`` into ``model`` strictly, casting floating tensors to ``dtype``.

    Quantized layers must already be quantized (see :func:`quantize_like`).

    Raises:
        WeightsError: a tensor is missing, unexpected or mis-shaped (named in the message).
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
        if tuple(expected[name].shape) != tuple(weights[name].shape):
            problems.append(
                f"tensor {name} has shape {tuple(weights[name].shape)}, expected {tuple(expected[name].shape)}"
            )
    if problems:
        raise WeightsError(f"{source}: " + "; ".join(problems[:4]))
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    model.update(tree_unflatten(list(weights.items())))


def quantize_like(model: nn.Module, weights: dict[str, mx.array], settings: dict[str, int]) -> None:
    """Quantize exactly the layers whose ``.scales`` the checkpoint holds."""
    nn.quantize(
        model,
        group_size=settings["group_size"],
        bits=settings["bits"],
        class_predicate=lambda path, _module: f"{path}.scales" in weights,
    )

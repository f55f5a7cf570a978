"""Resumable training checkpoints: adapter weights, optimizer state, step and history.

A checkpoint is a directory ``checkpoints/step-NNNNNN/`` under the adapter path holding
``adapters.safetensors``, ``adapter_config.json``, ``optimizer.safetensors`` and
``state.json``. ``checkpoints/latest.json`` names the newest complete one; it is replaced
atomically after the directory is fully written, so a crash mid-save leaves the previous
checkpoint in force. Data order and dropout are functions of (seed, step), so the step
restores them.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from lmx.errors import InvalidOptionError, ModelNotFoundError, WeightsError
from lmx.runtime.files import write_bytes
from lmx.train.lora import AdapterConfig, adapter_weights, atomic_save_safetensors, save_adapter

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest.json"


@dataclass
class Checkpoint:
    """A checkpoint read back from disk."""

    path: Path
    step: int
    state: dict[str, Any]
    adapters: dict[str, mx.array]
    optimizer: dict[str, mx.array]


def save_checkpoint(
    adapter_path: str | Path,
    step: int,
    model: nn.Module,
    optimizer: optim.Optimizer,
    adapter_config: AdapterConfig,
    state: dict[str, Any],
    keep: int = 1,
) -> Path:
    """Write the checkpoint of ``step`` and point ``latest.json`` at it; keep the newest ``keep``.

    Returns:
        The checkpoint directory.

    Raises:
        SaveError: a file could not be written; the checkpoint in force is unchanged.
    """
    root = Path(adapter_path) / CHECKPOINTS
    out = root / f"step-{step:06d}"
    save_adapter(model, out, adapter_config)
    atomic_save_safetensors(out / "optimizer.safetensors", dict(tree_flatten(optimizer.state)), {"format": "mlx"})
    write_bytes(out / "state.json", (json.dumps({**state, "step": step}, indent=1) + "\n").encode())
    write_bytes(root / LATEST, json.dumps({"step": step, "dir": out.name}).encode())
    old = sorted(p for p in root.glob("step-*") if p.is_dir() and p.name != out.name)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return out


def load_checkpoint(adapter_path: str | Path) -> Checkpoint:
    """Read the newest checkpoint under ``adapter_path``.

    Raises:
        ModelNotFoundError: there is no checkpoint.
        WeightsError: a checkpoint file is missing or corrupt.
    """
    root = Path(adapter_path) / CHECKPOINTS
    latest = root / LATEST
    if not latest.is_file():
        raise ModelNotFoundError(f"cannot resume: no checkpoint in {root} (no {LATEST})")
    try:
        pointer = json.loads(latest.read_text(encoding="utf-8"))
        path = root / str(pointer["dir"])
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        adapters = mx.load(str(path / "adapters.safetensors"), format="safetensors")
        optimizer = mx.load(str(path / "optimizer.safetensors"), format="safetensors")
    except (OSError, KeyError, TypeError, ValueError, RuntimeError) as e:
        raise WeightsError(f"cannot read the checkpoint named by {latest}: {e}") from e
    return Checkpoint(path, int(state["step"]), state, adapters, optimizer)


def restore(checkpoint: Checkpoint, model: nn.Module, optimizer: optim.Optimizer) -> None:
    """Load the checkpoint's adapter weights into ``model`` and its state into ``optimizer``.

    Raises:
        WeightsError: the checkpoint's tensors do not match the model's adapter.
    """
    expected = adapter_weights(model)
    if set(expected) != set(checkpoint.adapters):
        diff = sorted(set(expected) ^ set(checkpoint.adapters))
        raise WeightsError(f"{checkpoint.path}: adapter tensors differ from the model's: {', '.join(diff[:6])}")
    for name, value in checkpoint.adapters.items():
        if value.shape != expected[name].shape:
            raise WeightsError(
                f"{checkpoint.path}: tensor {name} has shape {value.shape}, expected {expected[name].shape}"
            )
    model.update(tree_unflatten(list(checkpoint.adapters.items())))
    optimizer.init(model.trainable_parameters())
    have = dict(tree_flatten(optimizer.state))
    if set(have) - {"learning_rate"} != set(checkpoint.optimizer) - {"learning_rate"}:
        diff = sorted(set(have) ^ set(checkpoint.optimizer))
        raise WeightsError(f"{checkpoint.path}: optimizer state differs from the model's: {', '.join(diff[:6])}")
    optimizer.state = tree_unflatten(list(checkpoint.optimizer.items()))
    mx.eval(model.parameters(), optimizer.state)


def check_compatible(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume when a setting that shapes the run changed.

    Raises:
        InvalidOptionError: naming each changed setting with both values.
    """
    changed = [f"{k}={saved.get(k)!r} -> {current[k]!r}" for k in current if saved.get(k) != current[k]]
    if changed:
        raise InvalidOptionError("cannot resume: the checkpoint was made with other settings: " + ", ".join(changed))

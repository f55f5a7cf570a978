"""LoRA: low-rank adapters on Linear and MLX-quantized Linear layers (QLoRA).

An adapted layer computes ``base(x) + (alpha / rank) * dropout(x) @ A @ B`` with ``A``
(in, rank) and ``B`` (rank, out); ``B`` starts at zero so a fresh adapter changes nothing.
On disk an adapter is a directory holding ``adapters.safetensors`` (tensors named
``<module path>.lora_a`` / ``.lora_b``) and ``adapter_config.json`` (rank, alpha, the
adapted module paths, and how it was trained). Both files are written atomically.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from lmx.errors import InvalidOptionError, ModelNotFoundError, WeightsError
from lmx.models.gguf_layers import GGUFEmbedding, GGUFLinear
from lmx.runtime.files import staged_file, write_bytes

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMAT = "lmx-lora"
# Layers LoRA adapts: float, MLX-quantized, and GGUF blocks on lmx's CPU kernels (frozen; the
# kernels give the gradient with respect to the input, which is all LoRA needs).
LINEAR_TYPES = (nn.Linear, nn.QuantizedLinear, GGUFLinear)


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` or ``nn.QuantizedLinear`` plus a trainable low-rank update.

    Args:
        base: the layer to adapt (kept as the child ``base``; frozen).
        rank: rank of the update (>= 1).
        alpha: the update is scaled by ``alpha / rank``.
        dropout: dropout probability on the update's input while training, in [0, 1).
        key: PRNG key for ``A``'s initialisation (default: MLX's global generator).
    """

    def __init__(
        self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, key: mx.array | None = None
    ) -> None:
        super().__init__()
        if not isinstance(base, LINEAR_TYPES):
            raise InvalidOptionError(
                f"LoRA wraps nn.Linear, nn.QuantizedLinear or GGUFLinear, got {type(base).__name__}"
            )
        out_dims, in_dims = linear_shape(base)
        base.freeze()
        self.base = base
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        self.scale = alpha / rank
        bound = 1 / math.sqrt(in_dims)  # as a Linear's init; B = 0 keeps the start point equal to the base
        self.lora_a = mx.random.uniform(-bound, bound, (in_dims, rank), key=key)
        self.lora_b = mx.zeros((rank, out_dims))

    # The PRNG key of the dropout mask (see set_dropout_keys); None: MLX's global generator.
    # A plain attribute, not a parameter.
    dropout_key: mx.array | None = None

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        if self.dropout > 0 and self.training:
            keep = mx.random.bernoulli(1 - self.dropout, x.shape, key=self.dropout_key)
            x = mx.where(keep, x / (1 - self.dropout), 0)
        z = (x @ self.lora_a.astype(x.dtype)) @ self.lora_b.astype(x.dtype)  # (..., out)
        return y + (self.scale * z).astype(y.dtype)

    def delta(self) -> mx.array:
        """The dense update ``scale * (A @ B).T``, shaped like the base weight (out, in)."""
        return (self.scale * (self.lora_a @ self.lora_b)).T

    def fused(self, *, dequantize: bool = False) -> nn.Module:
        """The base layer with the update merged in (a quantized base is re-quantized,
        or returned as a float ``nn.Linear`` when ``dequantize``)."""
        base = self.base
        out_dims, in_dims = linear_shape(base)
        has_bias = "bias" in base
        if isinstance(base, nn.QuantizedLinear):
            weight = _dequantized(base)
            merged = weight + self.delta().astype(weight.dtype)
            if not dequantize:
                q = nn.QuantizedLinear(in_dims, out_dims, has_bias, base.group_size, base.bits, mode=base.mode)
                q.weight, q.scales, *biases = mx.quantize(merged, base.group_size, base.bits, mode=base.mode)
                q.biases = biases[0] if biases else None
                if has_bias:
                    q.bias = base.bias
                return q
        elif isinstance(base, GGUFLinear):  # GGUF blocks are not re-encoded: the merge is a float layer
            weight = base.dequantized_weight()
            merged = weight + self.delta().astype(weight.dtype)
        else:
            merged = base.weight + self.delta().astype(base.weight.dtype)
        linear = nn.Linear(in_dims, out_dims, bias=has_bias)
        linear.weight = merged
        if has_bias:
            linear.bias = base.bias
        return linear


def linear_shape(layer: nn.Module) -> tuple[int, int]:
    """(out, in) dimensions of a Linear, QuantizedLinear or GGUFLinear."""
    if isinstance(layer, GGUFLinear):
        return layer.out_features, layer.in_features
    out_dims, cols = layer.weight.shape
    if isinstance(layer, nn.QuantizedLinear):
        return out_dims, cols * 32 // layer.bits
    return out_dims, cols


def _dequantized(layer: nn.Module) -> mx.array:
    if isinstance(layer, (GGUFLinear, GGUFEmbedding)):
        return layer.dequantized_weight()
    return mx.dequantize(layer.weight, layer.scales, layer.get("biases"), layer.group_size, layer.bits, mode=layer.mode)


# ---------------------------------------------------------------------- applying


@dataclass(frozen=True)
class AdapterConfig:
    """What ``adapter_config.json`` holds.

    Attributes:
        rank, alpha: the LoRA rank and alpha (scale = alpha / rank).
        modules: paths of the adapted layers, e.g. ``model.layers.3.self_attn.q_proj``.
        dropout: training dropout (inference never drops).
        base_model: the model the adapter was trained on, if known.
        train: the training settings, for the record.
    """

    rank: int
    alpha: float
    modules: tuple[str, ...]
    dropout: float = 0.0
    base_model: str | None = None
    train: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": ADAPTER_FORMAT,
            "version": 1,
            "rank": self.rank,
            "alpha": self.alpha,
            "scale": self.alpha / self.rank,
            "dropout": self.dropout,
            "modules": list(self.modules),
            "base_model": self.base_model,
            "train": self.train,
        }


def target_paths(model: nn.Module, targets: Iterable[str], num_layers: int = -1) -> list[str]:
    """Paths of the Linear/QuantizedLinear layers named in ``targets`` within the last
    ``num_layers`` decoder layers (-1: all).

    Raises:
        InvalidOptionError: ``num_layers`` exceeds the model's layers, or no layer matched.
    """
    layers = list(model.layers)
    n = len(layers) if num_layers == -1 else num_layers
    if not 1 <= n <= len(layers):
        raise InvalidOptionError(f"num_layers must be -1 or in [1, {len(layers)}] for this model, got {num_layers}")
    wanted = set(targets)
    chosen = {id(layer) for layer in layers[len(layers) - n :]}
    paths = []
    layer_path = {id(m): p for p, m in model.named_modules() if id(m) in chosen}
    for layer in layers[len(layers) - n :]:
        for sub, module in layer.named_modules():
            if sub.rsplit(".", 1)[-1] in wanted and isinstance(module, LINEAR_TYPES):
                paths.append(f"{layer_path[id(layer)]}.{sub}")
    if not paths:
        raise InvalidOptionError(f"targets {sorted(wanted)} matched no Linear layer in the model")
    return sorted(paths, key=_natural)


def _natural(path: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in path.split(".")]


def apply_lora(
    model: nn.Module,
    *,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    targets: Iterable[str] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    num_layers: int = -1,
    modules: Iterable[str] | None = None,
    seed: int | None = None,
) -> AdapterConfig:
    """Freeze ``model`` and wrap the chosen layers in :class:`LoRALinear` (in place).

    Args:
        model: an lmx model (``model.layers`` lists its decoder layers).
        rank, alpha, dropout: LoRA settings.
        targets, num_layers: which layers (see :func:`target_paths`); ignored when ``modules`` is given.
        modules: explicit layer paths to wrap.
        seed: seed for the ``A`` matrices (default: MLX's global generator).

    Returns:
        The adapter's :class:`AdapterConfig`.

    Raises:
        InvalidOptionError: a bad rank/alpha/dropout, or no matching layer.
        WeightsError: a path in ``modules`` is not a Linear layer of the model.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise InvalidOptionError(f"rank must be an integer >= 1, got {rank!r}")
    if not alpha > 0:
        raise InvalidOptionError(f"alpha must be > 0, got {alpha!r}")
    if not 0 <= dropout < 1:
        raise InvalidOptionError(f"dropout must be in [0, 1), got {dropout!r}")
    if has_adapter(model):
        raise InvalidOptionError("the model already has a LoRA adapter; unload_adapter(model) first")
    paths = list(modules) if modules is not None else target_paths(model, targets, num_layers)
    model.freeze()
    keys = mx.random.split(mx.random.key(seed), max(2, len(paths))) if seed is not None else None
    replacements = []
    named = dict(model.named_modules())
    for i, path in enumerate(paths):
        base = named.get(path)
        if not isinstance(base, LINEAR_TYPES):
            found = "nothing" if base is None else type(base).__name__
            raise WeightsError(f"adapter module {path!r}: expected a Linear layer in the model, found {found}")
        key = None if keys is None else keys[i]
        replacements.append((path, LoRALinear(base, rank, alpha, dropout, key=key)))
    model.update_modules(tree_unflatten(replacements))
    return AdapterConfig(rank=rank, alpha=float(alpha), modules=tuple(paths), dropout=float(dropout))


def set_dropout_keys(model: nn.Module, key: mx.array | None) -> None:
    """Give every LoRA layer with dropout its own key split from ``key`` (None: back to the
    global generator).

    Explicit keys make dropout reproducible (resume) and let gradient checkpointing, which
    runs a layer twice, draw the same mask both times.
    """
    layers = [layer for _, layer in lora_layers(model) if layer.dropout > 0]
    keys = mx.random.split(key, max(len(layers), 2)) if key is not None else [None] * len(layers)
    for layer, k in zip(layers, keys):
        object.__setattr__(layer, "dropout_key", k)  # not Module.__setattr__: that would make it a parameter


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """The model's :class:`LoRALinear` layers with their paths."""
    for path, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield path, module


def has_adapter(model: nn.Module) -> bool:
    """Whether any layer of ``model`` is a :class:`LoRALinear`."""
    return any(True for _ in lora_layers(model))


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    """The adapter tensors, ``{"<path>.lora_a": A, "<path>.lora_b": B, ...}``."""
    out = {}
    for path, layer in lora_layers(model):
        out[f"{path}.lora_a"] = layer.lora_a
        out[f"{path}.lora_b"] = layer.lora_b
    return out


def unload_adapter(model: nn.Module) -> bool:
    """Put the base layers back in place of every :class:`LoRALinear` (in place).

    Returns:
        Whether an adapter was removed.
    """
    restored = [(path, layer.base) for path, layer in lora_layers(model)]
    if restored:
        model.update_modules(tree_unflatten(restored))
    return bool(restored)


def fuse_lora(model: nn.Module, *, dequantize: bool = False) -> int:
    """Merge every adapter into its base layer (in place); see :meth:`LoRALinear.fused`.

    With ``dequantize``, every quantized Linear or Embedding of the model (adapted or not)
    becomes a float layer.

    Returns:
        How many layers were merged.
    """
    fused = [(path, layer.fused(dequantize=dequantize)) for path, layer in lora_layers(model)]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if dequantize:
        plain = []
        for path, module in model.named_modules():
            if isinstance(module, (nn.QuantizedLinear, GGUFLinear)):
                out_dims, in_dims = linear_shape(module)
                linear = nn.Linear(in_dims, out_dims, bias="bias" in module)
                linear.weight = _dequantized(module)
                if "bias" in module:
                    linear.bias = module.bias
                plain.append((path, linear))
            elif isinstance(module, (nn.QuantizedEmbedding, GGUFEmbedding)):
                embedding = nn.Embedding(module.num_embeddings, module.dims)
                embedding.weight = _dequantized(module)
                plain.append((path, embedding))
        if plain:
            model.update_modules(tree_unflatten(plain))
    return len(fused)


# ---------------------------------------------------------------------- files


def atomic_save_safetensors(path: Path, arrays: dict[str, mx.array], metadata: dict[str, str] | None = None) -> None:
    """``mx.save_safetensors`` through :func:`lmx.runtime.files.staged_file` (atomic, typed errors).

    Raises:
        SaveError: the file could not be written; ``path`` is unchanged.
    """
    with staged_file(path) as tmp:
        mx.save_safetensors(str(tmp), arrays, metadata=metadata or {})


def save_adapter(model: nn.Module, path: str | os.PathLike, config: AdapterConfig) -> Path:
    """Write ``adapters.safetensors`` and ``adapter_config.json`` into the directory ``path``.

    Returns:
        The directory.

    Raises:
        InvalidOptionError: the model has no adapter.
        SaveError: a file could not be written (read-only, full disk...); the old one is unchanged.
    """
    weights = adapter_weights(model)
    if not weights:
        raise InvalidOptionError("the model has no LoRA adapter to save")
    out = Path(path)
    atomic_save_safetensors(out / ADAPTER_WEIGHTS, weights, {"format": "mlx"})
    text = json.dumps(config.as_dict(), indent=2, default=str) + "\n"
    write_bytes(out / ADAPTER_CONFIG, text.encode("utf-8"))
    return out


def read_adapter_config(path: str | os.PathLike) -> AdapterConfig:
    """Read ``adapter_config.json`` from the adapter directory ``path``.

    Raises:
        ModelNotFoundError: no such directory or file.
        WeightsError: the file is not a valid lmx adapter config.
    """
    cfg_path = Path(path) / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise ModelNotFoundError(f"adapter {str(path)!r} not found: no {ADAPTER_CONFIG} in it")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{cfg_path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict) or raw.get("format") != ADAPTER_FORMAT:
        raise WeightsError(f"{cfg_path} is not an lmx LoRA adapter config (format must be {ADAPTER_FORMAT!r})")
    try:
        rank, alpha = raw["rank"], raw["alpha"]
        modules = raw["modules"]
        if not (isinstance(rank, int) and rank >= 1 and isinstance(alpha, (int, float)) and alpha > 0):
            raise ValueError(f"rank must be an int >= 1 and alpha > 0, got rank={rank!r}, alpha={alpha!r}")
        if not (isinstance(modules, list) and modules and all(isinstance(m, str) for m in modules)):
            raise ValueError(f"modules must be a non-empty list of layer paths, got {modules!r:.80}")
    except (KeyError, ValueError) as e:
        raise WeightsError(f"{cfg_path}: {e}") from e
    return AdapterConfig(
        rank=rank,
        alpha=float(alpha),
        modules=tuple(modules),
        dropout=float(raw.get("dropout") or 0.0),
        base_model=raw.get("base_model"),
        train=dict(raw.get("train") or {}),
    )


def read_adapter(path: str | os.PathLike) -> tuple[AdapterConfig, dict[str, mx.array]]:
    """An adapter directory's config and weights, as saved (not checked against any model).

    Raises:
        ModelNotFoundError: no adapter config or weights file there.
        InvalidOptionError, WeightsError: the config or the weights file is unreadable or bad.
    """
    config = read_adapter_config(path)
    weights_path = Path(path) / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise ModelNotFoundError(f"adapter {str(path)!r} has no {ADAPTER_WEIGHTS}")
    try:
        weights = mx.load(str(weights_path), format="safetensors")
    except (RuntimeError, ValueError, OSError) as e:
        raise WeightsError(f"cannot read {weights_path}: {e}") from e
    return config, weights


def load_adapter(model: nn.Module, path: str | os.PathLike) -> AdapterConfig:
    """Load the adapter in directory ``path`` onto ``model`` (replacing any adapter it had).

    All or nothing: if the adapter does not fit the model, the model is left as it was.
    Inference never applies dropout.

    Returns:
        The adapter's :class:`AdapterConfig`.

    Raises:
        ModelNotFoundError: no adapter at ``path``.
        WeightsError: the files are corrupt, or a tensor is missing, unexpected or
            mis-shaped for this model (named in the message).
    """
    config, weights = read_adapter(path)
    previous = [(p, layer) for p, layer in lora_layers(model)]
    unload_adapter(model)
    try:
        apply_lora(model, rank=config.rank, alpha=config.alpha, dropout=0.0, modules=config.modules)
        _load_weights_strict(model, weights, str(Path(path) / ADAPTER_WEIGHTS))
    except Exception:
        unload_adapter(model)
        if previous:
            model.update_modules(tree_unflatten(previous))
        raise
    mx.eval(model.parameters())
    return config


def _load_weights_strict(model: nn.Module, weights: dict[str, mx.array], source: str) -> None:
    expected = adapter_weights(model)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing tensor(s): {', '.join(missing[:6])}")
    if unexpected:
        problems.append(f"unexpected tensor(s): {', '.join(unexpected[:6])}")
    for name in sorted(set(expected) & set(weights)):
        if tuple(expected[name].shape) != tuple(weights[name].shape):
            problems.append(
                f"tensor {name} has shape {tuple(weights[name].shape)}, expected {tuple(expected[name].shape)}"
            )
    if problems:
        raise WeightsError(f"{source}: " + "; ".join(problems[:4]))
    model.update(tree_unflatten([(k, v.astype(mx.float32)) for k, v in weights.items()]))


def trainable_count(model: nn.Module) -> int:
    """Number of trainable (LoRA) parameters."""
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))

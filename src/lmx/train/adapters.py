"""Named LoRA adapters served side by side: each row of a batch uses its own adapter, or none.

An :class:`AdapterSet` holds the adapters loaded onto one model, by name. Every layer some
adapter adapts becomes a :class:`MultiLoRALinear`: it computes the base product once for the
whole batch, then, for each adapter that rows of this step use, adds
``scale * (x_rows @ A) @ B`` to those rows only. Rows without an adapter get the base output
exactly (they are never touched). Which row uses which adapter is set before each forward
pass with :meth:`AdapterSet.route` (the scheduler does, for its decode steps and prefills).

Loading is all or nothing: an adapter whose rank, shapes or target modules do not fit the
model is refused with a :class:`lmx.errors.WeightsError` naming the tensor or module, and
nothing of it is installed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from lmx.errors import InvalidOptionError, ModelNotFoundError, WeightsError
from lmx.generate.options import nearest_name
from lmx.train.lora import (
    ADAPTER_WEIGHTS,
    LINEAR_TYPES,
    AdapterConfig,
    LoRALinear,
    linear_shape,
    read_adapter_config,
)

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+-]{0,127}")
"""What an adapter name may be: letters, digits and ``. _ : @ / + -``, at most 128 characters."""


@dataclass(frozen=True)
class LoadedAdapter:
    """An adapter read from disk (weights evaluated), ready to install.

    Attributes:
        name: the name requests pick it by.
        path: the directory it was read from.
        config: its ``adapter_config.json``.
        weights: ``{"<module path>.lora_a": A (in, rank), "<module path>.lora_b": B (rank, out)}``.
    """

    name: str
    path: str
    config: AdapterConfig
    weights: dict[str, mx.array]


class _Routing:
    """Which rows of the current forward pass use which adapter (set by :meth:`AdapterSet.route`).

    ``groups`` holds ``(name, rows)`` pairs; ``rows`` is None when every row uses the adapter.
    """

    def __init__(self) -> None:
        self.groups: list[tuple[str, mx.array | None]] = []


class MultiLoRALinear(nn.Module):
    """A frozen Linear (float, MLX-quantized or GGUF blocks) plus any number of named LoRA
    updates, each applied to the rows the current routing gives it.

    Args:
        base: the layer to adapt (kept as the child ``base``).
        routing: the routing object shared by every layer of the model's :class:`AdapterSet`.
    """

    def __init__(self, base: nn.Module, routing: _Routing) -> None:
        super().__init__()
        base.freeze()
        self.base = base
        self.lora: dict[str, dict[str, mx.array]] = {}
        # Plain attributes, not parameters: the scales are floats, the routing is shared.
        object.__setattr__(self, "scales", {})
        object.__setattr__(self, "routing", routing)

    def add(self, name: str, a: mx.array, b: mx.array, scale: float) -> None:
        """Install adapter ``name``'s matrices ``a`` (in, rank) and ``b`` (rank, out)."""
        self.lora[name] = {"lora_a": a, "lora_b": b}
        self.scales[name] = scale  # type: ignore[attr-defined]

    def remove(self, name: str) -> None:
        """Remove adapter ``name`` (nothing if this layer does not hold it)."""
        self.lora.pop(name, None)
        self.scales.pop(name, None)  # type: ignore[attr-defined]

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        for name, rows in self.routing.groups:  # type: ignore[attr-defined]
            weights = self.lora.get(name)
            if weights is None:  # this adapter does not adapt this layer
                continue
            a, b = weights["lora_a"].astype(x.dtype), weights["lora_b"].astype(x.dtype)
            scale = self.scales[name]  # type: ignore[attr-defined]
            if rows is None:  # every row: as LoRALinear computes it
                y = y + (scale * ((x @ a) @ b)).astype(y.dtype)
            else:  # (n, ..., in) rows of this adapter only; the others keep the base output
                z = (x[rows] @ a) @ b  # (n, ..., out)
                y = y.at[rows].add((scale * z).astype(y.dtype))
        return y


class AdapterSet:
    """The named LoRA adapters loaded onto one model (see the module docstring).

    Only :meth:`install`, :meth:`remove`, :meth:`route` change the model or the routing; the
    engine calls them on the scheduler's worker, between two steps.

    Args:
        model: the model (its ``named_modules``/``update_modules``).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._adapters: dict[str, LoadedAdapter] = {}
        self._routing = _Routing()

    # ------------------------------------------------------------------ reading
    def names(self) -> list[str]:
        """The loaded adapters' names, in load order."""
        return list(self._adapters)

    def get(self, name: str) -> LoadedAdapter:
        """The loaded adapter ``name``.

        Raises:
            InvalidOptionError: no adapter of that name is loaded (the loaded ones are listed).
        """
        adapter = self._adapters.get(name)
        if adapter is None:
            raise InvalidOptionError(unknown_adapter_message(name, self.names()))
        return adapter

    def __contains__(self, name: object) -> bool:
        return name in self._adapters

    def __len__(self) -> int:
        return len(self._adapters)

    # ------------------------------------------------------------------ loading
    @staticmethod
    def read(path: str | os.PathLike, name: str | None = None) -> LoadedAdapter:
        """Read the adapter in directory ``path`` (any thread; the model is not touched).

        Args:
            path: the adapter directory (``adapters.safetensors`` + ``adapter_config.json``).
            name: its name; None: the directory's name.

        Raises:
            InvalidOptionError: a bad name.
            ModelNotFoundError: no adapter at ``path``.
            WeightsError: the files are corrupt or do not agree with each other.
        """
        directory = Path(path)
        name = check_name(default_name(path) if name is None else name)
        config = read_adapter_config(directory)
        weights_path = directory / ADAPTER_WEIGHTS
        if not weights_path.is_file():
            raise ModelNotFoundError(f"adapter {str(path)!r} has no {ADAPTER_WEIGHTS}")
        try:
            weights = mx.load(str(weights_path), format="safetensors")
        except (RuntimeError, ValueError, OSError) as e:
            raise WeightsError(f"cannot read {weights_path}: {e}") from e
        weights = {k: v.astype(mx.float32) for k, v in weights.items()}
        mx.eval(list(weights.values()))
        return LoadedAdapter(name, str(path), config, weights)

    def check(self, adapter: LoadedAdapter) -> None:
        """Check that ``adapter`` fits the model and its name is free.

        Raises:
            InvalidOptionError: an adapter of that name is loaded already.
            WeightsError: a target module is not a Linear layer of the model, or a tensor is
                missing, unexpected, or of the wrong shape (rank or layer size).
        """
        if adapter.name in self._adapters:
            raise InvalidOptionError(
                f"an adapter named {adapter.name!r} is loaded already (from {self._adapters[adapter.name].path}); "
                "unload it first or pick another name"
            )
        source = f"adapter {adapter.name!r} ({adapter.path})"
        named = dict(self.model.named_modules())
        rank = adapter.config.rank
        expected: dict[str, tuple[int, int]] = {}
        for path in adapter.config.modules:
            layer = named.get(path)
            if isinstance(layer, MultiLoRALinear):
                layer = layer.base
            if isinstance(layer, LoRALinear):
                raise InvalidOptionError(
                    f"{source}: the model already has a LoRA adapter applied to every request "
                    "(lmx.train.lora.load_adapter); unload it before loading named adapters"
                )
            if not isinstance(layer, LINEAR_TYPES):
                found = "nothing" if layer is None else type(layer).__name__
                raise WeightsError(
                    f"{source}: target module {path!r} is not a Linear layer of this model (found {found}); "
                    "was the adapter trained on another model?"
                )
            out_dims, in_dims = linear_shape(layer)
            expected[f"{path}.lora_a"] = (in_dims, rank)
            expected[f"{path}.lora_b"] = (rank, out_dims)
        problems = []
        missing = sorted(set(expected) - set(adapter.weights))
        unexpected = sorted(set(adapter.weights) - set(expected))
        if missing:
            problems.append(f"missing tensor(s): {', '.join(missing[:6])}")
        if unexpected:
            problems.append(f"unexpected tensor(s): {', '.join(unexpected[:6])}")
        for key in sorted(set(expected) & set(adapter.weights)):
            shape = tuple(adapter.weights[key].shape)
            if shape != expected[key]:
                problems.append(f"tensor {key} has shape {shape}, expected {expected[key]} (rank {rank})")
        if problems:
            raise WeightsError(f"{source}: " + "; ".join(problems[:4]))

    def install(self, adapter: LoadedAdapter) -> None:
        """Check ``adapter`` (see :meth:`check`) and put it on the model; nothing changes if it does not fit."""
        self.check(adapter)
        named = dict(self.model.named_modules())
        wrapped = []
        for path in adapter.config.modules:
            layer = named[path]
            if not isinstance(layer, MultiLoRALinear):
                layer = MultiLoRALinear(layer, self._routing)
                wrapped.append((path, layer))
            layer.add(
                adapter.name,
                adapter.weights[f"{path}.lora_a"],
                adapter.weights[f"{path}.lora_b"],
                adapter.config.alpha / adapter.config.rank,
            )
        if wrapped:
            self.model.update_modules(tree_unflatten(wrapped))
        self._adapters[adapter.name] = adapter

    def remove(self, name: str) -> None:
        """Take adapter ``name`` off the model; a layer left with no adapter becomes its base again.

        Raises:
            InvalidOptionError: no adapter of that name is loaded.
        """
        self.get(name)
        restored = []
        for path, module in self.model.named_modules():
            if isinstance(module, MultiLoRALinear):
                module.remove(name)
                if not module.lora:
                    restored.append((path, module.base))
        if restored:
            self.model.update_modules(tree_unflatten(restored))
        del self._adapters[name]

    # ------------------------------------------------------------------ routing
    def route(self, names: Sequence[str | None]) -> bool:
        """Set which adapter each row of the next forward passes uses (None: the base model).

        Returns:
            Whether any row uses an adapter.

        Raises:
            InvalidOptionError: a name is not loaded.
        """
        rows: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            if name is not None:
                self.get(name)
                rows.setdefault(name, []).append(i)
        groups: list[tuple[str, mx.array | None]] = []
        for name, members in rows.items():
            every = len(members) == len(names)
            groups.append((name, None if every else mx.array(members, dtype=mx.int32)))
        self._routing.groups = groups
        return bool(groups)


def check_name(name: object) -> str:
    """Check an adapter name (see :data:`NAME_PATTERN`).

    Raises:
        InvalidOptionError: the name is not a string of the allowed characters.
    """
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InvalidOptionError(
            f"adapter name must be 1-128 characters of letters, digits and '._:@/+-', starting with a letter "
            f"or digit, got {name!r:.80}"
        )
    return name


def default_name(path: str | os.PathLike) -> str:
    """The name of an adapter loaded without one: its directory's name."""
    directory = Path(path)
    return directory.resolve().name if directory.exists() else directory.name


def unknown_adapter_message(name: str, loaded: Sequence[str]) -> str:
    """The message for a request naming an adapter that is not loaded."""
    close = nearest_name(name, loaded)
    hint = f"; did you mean {close!r}?" if close else ""
    listed = ", ".join(repr(n) for n in loaded) if loaded else "none"
    return f"adapter {name!r} is not loaded{hint} (loaded adapters: {listed})"


__all__ = ["AdapterSet", "LoadedAdapter", "MultiLoRALinear", "check_name", "unknown_adapter_message"]

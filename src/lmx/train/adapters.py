"""Named LoRA adapters served side by side: each row of a batch uses its own adapter, or none.

An :class:`AdapterSet` holds the adapters loaded onto one model, by name. Every layer some
adapter adapts becomes a :class:`MultiLoRALinear`: it computes the base product once for the
whole batch, then adds each row's own ``scale * (x @ A) @ B``, the adapters of the step side
by side in two products, with a per-row mask that keeps each row to its adapter's columns.
Rows without an adapter get the base output exactly (their update is an exact zero). Which
row uses which adapter is set before each forward pass with :meth:`AdapterSet.route` (the
scheduler does, for its decode steps and prefills).

Loading is all or nothing: an adapter whose rank, shapes or target modules do not fit the
model is refused with a :class:`lmx.errors.WeightsError` naming the tensor or module, and
nothing of it is installed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

from lmx.errors import AdapterInUseError, InvalidOptionError, WeightsError
from lmx.generate.options import nearest_name
from lmx.train.lora import (
    LINEAR_TYPES,
    AdapterConfig,
    LoRALinear,
    linear_shape,
    read_adapter,
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
    """Which adapter each row of the current forward pass uses (set by :meth:`AdapterSet.route`).

    Attributes:
        names: the adapters rows use, in order of first use.
        uniform: every row uses ``names[0]`` (then a layer adds its update to all rows).
        rows: each row's adapter (None: the base model).
        scales: each loaded adapter's ``(rank, scale)``.
    """

    def __init__(self) -> None:
        self.names: tuple[str, ...] = ()
        self.uniform = False
        self.rows: tuple[str | None, ...] = ()
        self.scales: dict[str, tuple[int, float]] = {}
        self._masks: dict[tuple[tuple[str, ...], Any], mx.array] = {}

    def set(self, rows: Sequence[str | None]) -> None:
        self.rows = tuple(rows)
        self.names = tuple(dict.fromkeys(n for n in rows if n is not None))
        self.uniform = len(self.names) == 1 and None not in self.rows
        self._masks = {}

    def mask(self, held: tuple[str, ...], dtype: Any) -> mx.array:
        """(B, R) row weights of the concatenated update of adapters ``held``: row ``i``, in the
        columns of adapter ``n``, holds ``scale(n)`` if row ``i`` uses ``n``, else 0. Made once
        a step for every layer holding the same adapters."""
        key = (held, dtype)
        if key not in self._masks:
            columns = []
            for name in held:
                rank, scale = self.scales[name]
                columns.append(np.repeat(np.array([[scale if r == name else 0.0] for r in self.rows]), rank, axis=1))
            self._masks[key] = mx.array(np.concatenate(columns, axis=1).astype(np.float32)).astype(dtype)
        return self._masks[key]


class MultiLoRALinear(nn.Module):
    """A frozen Linear (float, MLX-quantized or GGUF blocks) plus any number of named LoRA
    updates, each applied to the rows the current routing gives it.

    The adapters a step's rows use are applied together: their ``A`` matrices side by side
    (in, R) and their ``B`` matrices stacked (R, out), so a step costs two products more than
    the base whatever the number of adapters; a (B, R) mask scales each row's own columns and
    zeroes the others, so a row without an adapter gets the base output exactly.

    Args:
        base: the layer to adapt (kept as the child ``base``).
        routing: the routing object shared by every layer of the model's :class:`AdapterSet`.
    """

    def __init__(self, base: nn.Module, routing: _Routing) -> None:
        super().__init__()
        base.freeze()
        self.base = base
        self.lora: dict[str, dict[str, mx.array]] = {}
        # Plain attributes, not parameters: the shared routing, and the adapters' matrices
        # joined (and cast) for each set of adapters a step uses.
        object.__setattr__(self, "routing", routing)
        object.__setattr__(self, "joined", {})

    def add(self, name: str, a: mx.array, b: mx.array) -> None:
        """Install adapter ``name``'s matrices ``a`` (in, rank) and ``b`` (rank, out)."""
        self.lora[name] = {"lora_a": a, "lora_b": b}
        self.joined.clear()  # type: ignore[attr-defined]

    def remove(self, name: str) -> None:
        """Remove adapter ``name`` (nothing if this layer does not hold it)."""
        self.lora.pop(name, None)
        self.joined.clear()  # type: ignore[attr-defined]

    def _joined(self, held: tuple[str, ...], dtype: Any) -> tuple[mx.array, mx.array]:
        key = (held, dtype)
        joined = self.joined  # type: ignore[attr-defined]
        if key not in joined:
            a = mx.concatenate([self.lora[n]["lora_a"] for n in held], axis=1).astype(dtype)  # (in, R)
            b = mx.concatenate([self.lora[n]["lora_b"] for n in held], axis=0).astype(dtype)  # (R, out)
            mx.eval(a, b)
            joined[key] = (a, b)
        return joined[key]

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        routing: _Routing = self.routing  # type: ignore[attr-defined]
        held = tuple(n for n in routing.names if n in self.lora)
        if not held:
            return y
        a, b = self._joined(held, x.dtype)
        if routing.uniform:  # every row, one adapter: as LoRALinear computes it
            _, scale = routing.scales[held[0]]
            return y + (scale * ((x @ a) @ b)).astype(y.dtype)
        mask = routing.mask(held, x.dtype)  # (B, R)
        mask = mask.reshape(mask.shape[0], *([1] * (x.ndim - 2)), mask.shape[1])  # (B, ..., R)
        return y + (((x @ a) * mask) @ b).astype(y.dtype)


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
        config, weights = read_adapter(directory)
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
            layer.add(adapter.name, adapter.weights[f"{path}.lora_a"], adapter.weights[f"{path}.lora_b"])
        if wrapped:
            self.model.update_modules(tree_unflatten(wrapped))
        self._adapters[adapter.name] = adapter
        config = adapter.config
        self._routing.scales[adapter.name] = (config.rank, config.alpha / config.rank)

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
        del self._routing.scales[name]

    def unload(self, name: str | None, in_use: Mapping[str, int]) -> list[str]:
        """Remove adapter ``name`` (None: every adapter) unless requests use it; return the
        names removed.

        Args:
            name: the adapter, or None for all.
            in_use: how many running or waiting requests use each adapter.

        Raises:
            InvalidOptionError: no adapter ``name`` is loaded.
            AdapterInUseError: requests use it (or, for all, one of them); nothing is removed.
        """
        names = self.names() if name is None else [self.get(name).name]
        busy = {n: in_use[n] for n in names if in_use.get(n)}
        if busy:
            listed = ", ".join(f"{n!r} ({k} request{'s' * (k > 1)})" for n, k in busy.items())
            raise AdapterInUseError(
                f"cannot unload adapter {listed}: requests running or waiting use it; "
                "cancel them or wait for them to end, then unload"
            )
        for n in names:
            self.remove(n)
        return names

    # ------------------------------------------------------------------ routing
    def route(self, names: Sequence[str | None]) -> bool:
        """Set which adapter each row of the next forward passes uses (None: the base model).

        Returns:
            Whether any row uses an adapter.

        Raises:
            InvalidOptionError: a name is not loaded.
        """
        for name in names:
            if name is not None:
                self.get(name)
        self._routing.set(names)
        return bool(self._routing.names)


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

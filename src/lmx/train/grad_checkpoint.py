"""Gradient checkpointing by wrapping decoder-layer instances (no class is patched).

:class:`CheckpointedLayer` stands in for one layer in ``model.layers``. It holds the
layer's own child modules under the same names, so parameter paths (and hence adapter and
optimizer-state names) do not change, and it runs the layer under :func:`mx.checkpoint`:
the layer's activations are recomputed in the backward pass instead of being kept.
The recomputation runs the layer's Python code again, so anything random in it must come
from fixed keys: the trainer gives each LoRA layer its dropout key (see
:func:`lmx.train.lora.set_dropout_keys`).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn


class CheckpointedLayer(nn.Module):
    """A decoder layer whose activations are recomputed during backpropagation.

    Args:
        layer: the layer to wrap; its children are shared, not copied.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        # Kept outside the module tree: the children below already hold its parameters.
        object.__setattr__(self, "_layer", layer)
        for name, child in layer.items():
            if not isinstance(child, nn.Module):
                raise TypeError(f"cannot checkpoint a layer holding a direct array or list ({name!r})")
            self[name] = child

    @property
    def layer(self) -> nn.Module:
        return self._layer

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        layer = self._layer

        def run(params: Any, h: mx.array) -> mx.array:
            self.update(params)  # the same child modules as the layer's
            return layer(h, *args, **kwargs)

        return mx.checkpoint(run)(self.trainable_parameters(), x)


def checkpoint_layers(model: Any) -> int:
    """Wrap every decoder layer of ``model`` in a :class:`CheckpointedLayer` (in place).

    Returns:
        How many layers were wrapped (already wrapped ones are left as they are).
    """
    layers = model.layers
    n = 0
    for i, layer in enumerate(layers):
        if not isinstance(layer, CheckpointedLayer):
            layers[i] = CheckpointedLayer(layer)
            n += 1
    return n


def uncheckpoint_layers(model: Any) -> int:
    """Put the original layers back; returns how many were unwrapped."""
    layers = model.layers
    n = 0
    for i, layer in enumerate(layers):
        if isinstance(layer, CheckpointedLayer):
            layers[i] = layer.layer
            n += 1
    return n

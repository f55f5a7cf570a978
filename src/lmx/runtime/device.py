"""Device selection: the GPU when MLX has one, else the CPU; ``LMX_DEVICE`` overrides."""

from __future__ import annotations

import mlx.core as mx

from lmx.errors import InvalidOptionError
from lmx.runtime import settings

DEVICES = ("cpu", "gpu")


def gpu_available() -> bool:
    """Return True when this MLX build can run on a GPU (Metal or CUDA)."""
    try:
        return bool(mx.is_available(mx.gpu))
    except (AttributeError, RuntimeError):
        return False


def choose_device(name: str | None = None) -> mx.Device:
    """Pick the device lmx runs on and make it MLX's default.

    Args:
        name: ``"cpu"``, ``"gpu"`` or None (then ``LMX_DEVICE``, then the GPU if present).

    Returns:
        The chosen ``mx.Device``.

    Raises:
        InvalidOptionError: the name is not cpu/gpu, or gpu was asked for without one.
    """
    name = name or settings.LMX_DEVICE.get() or ("gpu" if gpu_available() else "cpu")
    name = name.lower()
    if name not in DEVICES:
        raise InvalidOptionError(f"device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "gpu" and not gpu_available():
        raise InvalidOptionError("device 'gpu' was asked for, but this MLX build has no GPU backend")
    device = mx.gpu if name == "gpu" else mx.cpu
    mx.set_default_device(device)
    return mx.default_device()


def device_name(device: mx.Device | None = None) -> str:
    """Return ``"cpu"`` or ``"gpu"`` for a device (default: MLX's current default)."""
    device = device or mx.default_device()
    return "gpu" if device.type == mx.gpu else "cpu"


def backend_name() -> str:
    """Return a human name of the compute backend: ``metal``, ``cuda`` or ``cpu``."""
    if device_name() == "cpu":
        return "cpu"
    try:
        if mx.metal.is_available():
            return "metal"
    except AttributeError:
        pass
    return "cuda"

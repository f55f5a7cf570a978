"""Find a model and load it: a path as given, or the bundled default (assembled and converted once)."""

from __future__ import annotations

import os

from lmx.loading.default_model import default_gguf_path, default_model_path
from lmx.loading.loader import LoadedModel, kernel_types_for, load_path
from lmx.runtime.distributed import Group


def load_model(
    path: str | os.PathLike | None = None,
    *,
    dtype: str | None = "auto",
    cpu_kernels: bool | None = None,
    gguf_on_device: str | None = None,
    group: Group | None = None,
) -> LoadedModel:
    """Load a model from an HF directory or a ``.gguf`` file (None: the bundled default).

    Args:
        path: the model; None for the bundled default, read from its GGUF file when the CPU kernels
            run it, else from its converted float32 directory.
        dtype: see :func:`lmx.loading.loader.resolve_dtype`.
        cpu_kernels, gguf_on_device, group: see :func:`lmx.loading.loader.load_path`.

    Raises:
        ModelNotFoundError: nothing loadable at ``path``.
        InvalidOptionError: ``cpu_kernels=True`` where the kernels cannot run.
        UnsupportedModelError, ConfigError, WeightsError, TokenizerError: as named.
    """
    split = group is not None and group.size > 1
    if path is None:
        path = default_gguf_path() if not split and kernel_types_for(cpu_kernels) else default_model_path()
    return load_path(path, dtype=dtype, cpu_kernels=cpu_kernels, gguf_on_device=gguf_on_device, group=group)

"""What ``Engine.info()`` says of a GGUF file's blocks and of a tensor-parallel group."""

from __future__ import annotations

from typing import Any

from lmx.loading import LoadedModel


def affine_layer(modules: dict[str, Any], path: str) -> Any:
    """The quantized layer at ``path``, under a LoRA wrapper if one adapts it."""
    layer = modules[path]
    return layer if hasattr(layer, "bits") else layer.base


def affine_values(loaded: LoadedModel) -> int:
    """Values held by the GGUF model's MLX affine layers minus the array sizes counted for them."""
    modules = dict(loaded.model.named_modules())
    total = 0
    for path in loaded.gguf_affine:
        layer = affine_layer(modules, path)
        total += layer.weight.size * 32 // layer.bits - layer.weight.size - layer.scales.size - layer.biases.size
    return total


def parallel_report(loaded: LoadedModel) -> dict[str, Any] | None:
    """The group this rank belongs to and what of the model it holds (None: not split)."""
    if loaded.group is None or loaded.shards is None:
        return None
    group = loaded.group
    return {
        "size": group.size,
        "rank": group.rank,
        "backend": group.backend,
        "split": group.split,
        "holds": dict(loaded.shards.holds),
        "ranks": [dict(h) for h in loaded.shards.ranks],
    }


def gguf_report(loaded: LoadedModel) -> dict[str, Any]:
    """What a GGUF file holds and what of it runs as blocks: for ``info()``, not "float32" alone."""
    from lmx.io import gguf_quants
    from lmx.io.gguf import file_type_name, read_header, tensor_type_counts
    from lmx.models.gguf_layers import GGUFEmbedding, GGUFLinear

    header = read_header(loaded.source)
    kernels: dict[str, int] = {}
    for _, module in loaded.model.named_modules():
        if isinstance(module, (GGUFLinear, GGUFEmbedding)):
            name = gguf_quants.type_name(module.ggml_type)
            kernels[name] = kernels.get(name, 0) + 1
    affine: dict[str, dict[str, Any]] = {}
    modules = dict(loaded.model.named_modules())
    for path, ggml_type in loaded.gguf_affine.items():
        runs_as = gguf_quants.affine_name(affine_layer(modules, path).bits, ggml_type)
        entry = affine.setdefault(gguf_quants.type_name(ggml_type), {"runs_as": runs_as, "matrices": 0})
        entry["matrices"] += 1
    return {
        "gguf_file_type": file_type_name(header),
        "gguf_types": tensor_type_counts(header),
        "kernel_types": dict(sorted(kernels.items(), key=lambda kv: (-kv[1], kv[0]))) or None,
        "affine_types": dict(sorted(affine.items(), key=lambda kv: (-kv[1]["matrices"], kv[0]))) or None,
    }

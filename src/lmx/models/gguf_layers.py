"""Linear and Embedding layers whose weights stay in a GGUF file's quantized blocks (lmx's kernels).

Each weight is a uint8 array of shape (rows, bytes per row) holding the file's blocks as they are;
:mod:`lmx.kernels` decodes them to the exact float32 values of the dequantized model inside the
matrix product, so these layers compute what ``nn.Linear``/``nn.Embedding`` over the dequantized
weights compute, up to summation order, while reading about a quarter of the bytes. The loader
puts them in (see :func:`use_gguf_blocks`) only where the load profile runs lmx's kernels, for a
GGUF model. The weights are frozen: LoRA trains adapters on top
(the gradient with respect to the input is ``dL/dy @ W``); they have no gradient themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from lmx.errors import WeightsError


def _kernels() -> ModuleType:
    from lmx.kernels import load_module

    module, reason = load_module()
    if module is None:
        raise WeightsError(f"this layer needs lmx's kernels (lmx.kernels), which are unavailable: {reason}")
    return module


class GGUFLinear(nn.Module):
    """``y = x @ W.T (+ bias)`` with ``W`` as GGUF blocks: ``weight`` is uint8 (out_features, bytes per row)."""

    def __init__(self, in_features: int, out_features: int, ggml_type: int, bias: bool = False) -> None:
        super().__init__()
        values, nbytes = _kernels().block_geometry(ggml_type)
        if not values or in_features % values:
            raise WeightsError(f"GGML type {ggml_type} cannot hold rows of {in_features} values")
        self.in_features, self.out_features, self.ggml_type = in_features, out_features, ggml_type
        self.int8_activations = False  # see lmx.kernels.qmatmul
        self.weight = mx.zeros((out_features, in_features // values * nbytes), dtype=mx.uint8)
        if bias:
            self.bias = mx.zeros((out_features,))
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        y = _kernels().qmatmul(x, self.weight, self.ggml_type, self.in_features, int8_activations=self.int8_activations)
        return y + self.bias.astype(y.dtype) if "bias" in self else y

    def dequantized_weight(self) -> mx.array:
        """The float32 weight (out_features, in_features), exactly as the dequantized model holds it."""
        return _kernels().dequantize_rows(self.weight, self.ggml_type, self.in_features)


class GGUFEmbedding(nn.Module):
    """An embedding table in GGUF blocks; ``as_linear`` is the tied LM head."""

    def __init__(self, num_embeddings: int, dims: int, ggml_type: int, dtype: mx.Dtype = mx.float32) -> None:
        super().__init__()
        values, nbytes = _kernels().block_geometry(ggml_type)
        if not values or dims % values:
            raise WeightsError(f"GGML type {ggml_type} cannot hold rows of {dims} values")
        self.num_embeddings, self.dims, self.ggml_type = num_embeddings, dims, ggml_type
        self.int8_activations = False
        self.out_dtype = dtype  # the model's activation dtype (decoding gives float32)
        self.weight = mx.zeros((num_embeddings, dims // values * nbytes), dtype=mx.uint8)
        self.freeze()

    def __call__(self, ids: mx.array) -> mx.array:
        rows = self.weight[ids]  # (..., bytes per row): only the looked-up rows are decoded
        return _kernels().dequantize_rows(rows, self.ggml_type, self.dims).astype(self.out_dtype)

    def as_linear(self, x: mx.array) -> mx.array:
        return _kernels().qmatmul(x, self.weight, self.ggml_type, self.dims, int8_activations=self.int8_activations)

    def dequantized_weight(self) -> mx.array:
        """The float32 table (num_embeddings, dims)."""
        return _kernels().dequantize_rows(self.weight, self.ggml_type, self.dims)


def decode_blocks(layers: Sequence[nn.Module]) -> list[tuple[mx.array, int]] | None:
    """Each layer's (blocks, GGML type) where every one is a plain :class:`GGUFLinear` (no bias, exact
    float32 products, not wrapped by an adapter): what a fused decode-layer op of :mod:`lmx.kernels`
    may read in their place; else None."""
    out = []
    for layer in layers:
        if type(layer) is not GGUFLinear or "bias" in layer or layer.int8_activations:
            return None
        out.append((layer.weight, layer.ggml_type))
    return out


def decode_rows(x: mx.array) -> bool:
    """Whether ``x`` is what the fused decode-layer ops take: float32 (B, 1, dim) with 1 <= B <= 8."""
    return x.dtype == mx.float32 and x.ndim == 3 and x.shape[1] == 1 and 1 <= x.shape[0] <= 8


def norm_scales(norms: Sequence[nn.Module]) -> tuple[list[mx.array], float] | None:
    """The norms' float32 scales and their one eps (a fused op takes one), else None."""
    scales = [norm.scale() for norm in norms]
    if any(s.dtype != mx.float32 for s in scales) or len({norm.eps for norm in norms}) != 1:
        return None
    return scales, norms[0].eps


def use_gguf_blocks(
    model: nn.Module, block_types: dict[str, int], dtype: mx.Dtype, source: str, int8_activations: bool = False
) -> None:
    """Replace the layers whose ``<path>.weight`` is in ``block_types`` by GGUF-block layers (in place).

    ``int8_activations``: their one-token products quantize the activations to int8 per 32 values
    (llama.cpp's arithmetic: faster, logits differ from the exact product by that rounding).

    The new layers hold zero placeholders of the blocks' shape; load the weights afterwards
    (:func:`lmx.io.hf.apply_weights` checks every shape and dtype strictly).

    Raises:
        WeightsError: a name is not the weight of a Linear or Embedding layer of ``model``.
    """
    modules = dict(model.named_modules())
    replacements = []
    for name, ggml_type in block_types.items():
        path = name.removesuffix(".weight")
        layer = modules.get(path)
        if isinstance(layer, nn.Linear):
            out_features, in_features = layer.weight.shape
            replacements.append((path, GGUFLinear(in_features, out_features, ggml_type, bias="bias" in layer)))
        elif isinstance(layer, nn.Embedding):
            num, dims = layer.weight.shape
            replacements.append((path, GGUFEmbedding(num, dims, ggml_type, dtype)))
        else:
            found = type(layer).__name__ if layer is not None else "nothing"
            raise WeightsError(f"{source}: {name} is not a Linear or Embedding weight of the model (found {found})")
    for _, layer in replacements:
        layer.int8_activations = int8_activations
    if replacements:
        model.update_modules(tree_unflatten(replacements))


def use_huge_pages(model: nn.Module) -> int:
    """Back the evaluated GGUF-block weights of ``model`` with transparent huge pages where they span
    whole 2 MiB pages (the kernels' ``huge_pages``: the values stay as they are); return those bytes.

    A decode step streams every weight once: on 4 KiB pages the tied head of Gemma 3 270M (178 MB) costs
    a TLB miss every few rows; backed by 2 MiB pages it read 1.4-1.5x faster (benchmarks/RESULTS.md, round 8).
    """
    kernels = _kernels()
    layers = [m for _, m in model.named_modules() if isinstance(m, (GGUFLinear, GGUFEmbedding))]
    return sum(kernels.huge_pages(layer.weight) for layer in layers)


def gguf_block_values(model: nn.Module) -> int:
    """Values held in GGUF blocks minus their byte count: add to a parameter count made of array sizes."""
    total = 0
    for _, m in model.named_modules():
        if isinstance(m, GGUFLinear):
            total += m.in_features * m.out_features - m.weight.size
        elif isinstance(m, GGUFEmbedding):
            total += m.num_embeddings * m.dims - m.weight.size
    return total


def uses_gguf_blocks(model: nn.Module) -> bool:
    """Whether any layer of ``model`` runs on lmx's kernels (GGUF blocks)."""
    return any(isinstance(m, (GGUFLinear, GGUFEmbedding)) for _, m in model.named_modules())


__all__ = [
    "GGUFEmbedding",
    "GGUFLinear",
    "decode_blocks",
    "decode_rows",
    "gguf_block_values",
    "norm_scales",
    "use_gguf_blocks",
    "use_huge_pages",
    "uses_gguf_blocks",
]

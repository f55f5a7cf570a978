"""Merge a LoRA adapter into its base model and write a loadable HF-layout directory."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from lmx.errors import InvalidOptionError
from lmx.loading import DTYPES, load_model
from lmx.train.lora import fuse_lora, load_adapter

logger = logging.getLogger(__name__)

# Tokenizer-side files of an HF directory, copied as they are so nothing is lost in a rewrite.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def fuse(
    model: str | os.PathLike | None,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dequantize: bool = False,
    dtype: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Load ``model``, merge the adapter at ``adapter`` into it, and write ``out``.

    ``out`` gets ``config.json``, ``model.safetensors`` (metadata ``{"format": "mlx"}``),
    ``generation_config.json`` and the tokenizer files (copied from an HF source; written
    from the GGUF vocabulary otherwise); ``lmx.load(out)`` loads it. The directory is built
    in a temporary sibling and renamed into place, so a failure leaves no partial ``out``.
    The merge runs in float32.

    Args:
        model: the base model (HF dir or .gguf; None: the bundled default).
        adapter: the adapter directory (``adapters.safetensors`` + ``adapter_config.json``).
        out: the directory to create.
        dequantize: write MLX-quantized layers as float layers (else merged layers are
            re-quantized with the base's settings).
        dtype: float32, bfloat16 or float16 for the float weights (default: the base's
            ``torch_dtype``, else float32).
        overwrite: replace an existing ``out``.

    Returns:
        The output directory.

    Raises:
        InvalidOptionError: a bad dtype, ``out`` exists (without ``overwrite``), or ``out``
            is the base model's own directory.
        and the errors of :func:`lmx.load` and :func:`lmx.train.lora.load_adapter`.
    """
    if dtype is not None and dtype not in DTYPES:
        raise InvalidOptionError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out).expanduser()
    loaded = load_model(model, dtype="float32", cpu_kernels=False)  # merges into float weights
    source = Path(loaded.source)
    if source.is_dir() and out.resolve() == source.resolve():
        raise InvalidOptionError(f"out must not be the base model's directory ({out})")
    if out.exists() and not overwrite:
        raise InvalidOptionError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    load_adapter(loaded.model, adapter)
    n = fuse_lora(loaded.model, dequantize=dequantize)
    logger.info("merged %d adapted layers", n)
    quant = None if dequantize else loaded.quantization
    target = dtype or _checkpoint_dtype(loaded.config)
    if target != "float32":
        cast = [
            (k, v.astype(DTYPES[target]))
            for k, v in tree_flatten(loaded.model.parameters())
            if mx.issubdtype(v.dtype, mx.floating) and not k.endswith((".scales", ".biases"))
        ]
        loaded.model.update(tree_unflatten(cast))
    from lmx.loading.convert import write_hf_dir
    from lmx.runtime.files import staged_dir

    with staged_dir(out) as tmp:
        write_hf_dir(loaded, tmp, quant)
        if source.is_dir():
            for name in _TOKENIZER_FILES:
                if (source / name).is_file():
                    shutil.copy2(source / name, tmp / name)
            if (source / "additional_chat_templates").is_dir():
                shutil.copytree(source / "additional_chat_templates", tmp / "additional_chat_templates")
    return out


def _checkpoint_dtype(config: dict) -> str:
    name = config.get("torch_dtype") or config.get("dtype") or "float32"
    return name if name in DTYPES else "float32"

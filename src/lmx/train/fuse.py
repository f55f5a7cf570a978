"""Merge a LoRA adapter into its base model and write a loadable model: an HF-layout directory,
or, for a GGUF base, a GGUF file that keeps the base's quantized blocks."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from lmx.errors import InvalidOptionError
from lmx.loading import DTYPES, LoadedModel, load_model
from lmx.train.lora import fuse_lora, load_adapter, lora_layers

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

    When ``out`` ends in ``.gguf`` (the base must then be a GGUF file) it is written as a GGUF
    file: every matrix the adapter does not touch keeps its blocks byte for byte, so the fused
    model runs on lmx's CPU kernels as fast as its base; merged matrices are written as Q8_0
    (float ones stay float; see :mod:`lmx.loading.gguf_write`), and a log line names them.
    Otherwise:
    ``out`` gets ``config.json``, ``model.safetensors`` (metadata ``{"format": "mlx"}``),
    ``generation_config.json`` and the tokenizer files (copied from an HF source; written
    from the GGUF vocabulary otherwise); ``lmx.load(out)`` loads it. The directory is built
    in a temporary sibling and renamed into place, so a failure leaves no partial ``out``.
    The merge runs in float32.

    Args:
        model: the base model (HF dir or .gguf; None: the bundled default).
        adapter: the adapter directory (``adapters.safetensors`` + ``adapter_config.json``).
        out: the directory to create, or a ``.gguf`` file (GGUF base only).
        dequantize: write MLX-quantized layers as float layers (else merged layers are
            re-quantized with the base's settings).
        dtype: float32, bfloat16 or float16 for the float weights (default: the base's
            ``torch_dtype``, else float32).
        overwrite: replace an existing ``out``.

    Returns:
        The output directory or file.

    Raises:
        InvalidOptionError: a bad dtype, ``out`` exists (without ``overwrite``), ``out`` is the
            base model's own directory or file, or a ``.gguf`` ``out`` for a base that is not
            GGUF (or with ``dequantize``/``dtype``, which a GGUF output does not take).
        and the errors of :func:`lmx.load` and :func:`lmx.train.lora.load_adapter`.
    """
    if dtype is not None and dtype not in DTYPES:
        raise InvalidOptionError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out).expanduser()
    to_gguf = out.suffix.lower() == ".gguf"
    if to_gguf and (dequantize or dtype is not None):
        raise InvalidOptionError("a .gguf output keeps the base's types: dequantize and dtype do not apply to it")
    loaded = load_model(model, dtype="float32", cpu_kernels=False, gguf_on_device="float")  # merges into floats
    source = Path(loaded.source)
    if out.resolve() == source.resolve():
        raise InvalidOptionError(f"out must not be the base model itself ({out})")
    if out.exists() and not overwrite:
        raise InvalidOptionError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    if to_gguf and source.suffix.lower() != ".gguf":
        raise InvalidOptionError(
            f"a .gguf output needs a GGUF base (its blocks and vocabulary are copied); {source} is not one: "
            "give a directory as out"
        )
    load_adapter(loaded.model, adapter)
    if to_gguf:
        return _fuse_to_gguf(loaded, source, out)
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


def _fuse_to_gguf(loaded: LoadedModel, source: Path, out: Path) -> Path:
    from lmx.loading.gguf_write import write_replaced
    from lmx.models import GGUF_ARCHITECTURES

    paths = [path for path, _ in lora_layers(loaded.model)]
    fuse_lora(loaded.model)
    modules = dict(loaded.model.named_modules())
    merged = {f"{path}.weight": modules[path].weight for path in paths}
    written = write_replaced(source, out, merged, GGUF_ARCHITECTURES)
    changed = sorted(name for name, (before, after) in written.items() if before != after)
    logger.info("merged %d matrices into %s; every other tensor keeps its blocks", len(written), out)
    if changed:
        logger.warning(
            "%d merged matrices were re-encoded as Q8_0 (the gguf package cannot write K-quants, and a 4-bit "
            "grid would erase most of the adapter's change): %s",
            len(changed),
            ", ".join(f"{n} (was {written[n][0]})" for n in changed),
        )
    return out


def _checkpoint_dtype(config: dict) -> str:
    name = config.get("torch_dtype") or config.get("dtype") or "float32"
    return name if name in DTYPES else "float32"

"""``lmx convert``: a GGUF file or HF directory -> an HF-layout directory or a GGUF file, written atomically."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from tokenizers import Tokenizer as TokenizerBackend
from tokenizers import processors

from lmx.errors import InvalidOptionError
from lmx.loading.loader import DTYPES, LoadedModel, load_path
from lmx.models import get_architecture
from lmx.runtime.files import staged_dir
from lmx.tokenizer import Tokenizer

Q_BITS = (4, 8)
Q_GROUP_SIZES = (32, 64, 128)


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str = "float32",
    q_bits: int | None = None,
    q_group_size: int = 64,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Convert ``src`` (GGUF file or HF dir) to an HF-layout directory, or a GGUF file, at ``out``.

    An ``out`` ending in ``.gguf`` is written as one GGUF file (see :mod:`lmx.loading.convert_gguf`):
    matrices in ``dtype`` (F32/F16/BF16), or Q8_0 with ``q_bits=8``; its vocabulary, special tokens
    and chat template are the source tokenizer's. Otherwise the directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
    generation_config.json) is built in a temporary sibling and renamed into place, so an
    interrupted conversion leaves no half-written ``out``.

    Args:
        src: the model to read.
        out: the directory to create, or a ``.gguf`` file.
        dtype: float32, bfloat16 or float16 for the (non-quantized) weights.
        q_bits: 4 or 8 to store Linear/Embedding weights MLX-quantized (affine), else None; for a
            ``.gguf`` out only 8 (Q8_0).
        q_group_size: quantization group size (32, 64 or 128); a ``.gguf`` out ignores it (Q8_0
            blocks are 32 values).
        overwrite: replace an existing ``out``.
        progress: called as ``progress(done, total)`` while tensors are written.

    Returns:
        The output directory.

    Raises:
        InvalidOptionError: a bad dtype, bit width or group size (for GGUF: any but 8), or ``out`` exists.
        UnsupportedModelError: a GGUF ``out`` for a model or tokenizer GGUF cannot describe.
        and the load errors of :func:`lmx.load`.
    """
    if dtype not in DTYPES:
        raise InvalidOptionError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if q_bits is not None and q_bits not in Q_BITS:
        raise InvalidOptionError(f"q_bits must be one of {Q_BITS}, got {q_bits!r}")
    if q_group_size not in Q_GROUP_SIZES:
        raise InvalidOptionError(f"q_group_size must be one of {Q_GROUP_SIZES}, got {q_group_size!r}")
    out = Path(out).expanduser()
    if os.path.lexists(out) and not overwrite:
        raise InvalidOptionError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    if out.suffix.lower() == ".gguf":
        return _convert_to_gguf(src, out, dtype, q_bits, progress)
    loaded = load_path(src, dtype=dtype, cpu_kernels=False, gguf_on_device="float")  # writes float weights
    quant = None
    if q_bits is not None:
        quant = {"group_size": q_group_size, "bits": q_bits}
        nn.quantize(loaded.model, group_size=q_group_size, bits=q_bits)
    with staged_dir(out) as tmp:
        write_hf_dir(loaded, tmp, quant or loaded.quantization, progress)
    return out


def _convert_to_gguf(
    src: str | os.PathLike,
    out: Path,
    dtype: str,
    q_bits: int | None,
    progress: Callable[[int, int], None] | None,
) -> Path:
    from lmx.loading.convert_gguf import GGUF_Q_BITS, write_gguf

    if q_bits is not None and q_bits not in GGUF_Q_BITS:
        raise InvalidOptionError(
            f"a .gguf out is quantized to Q8_0 only (q_bits=8, --q-bits 8); got q_bits={q_bits!r}. "
            "For 4-bit weights convert to a directory (MLX affine) instead"
        )
    if out.is_dir() and not os.path.islink(out):
        raise InvalidOptionError(f"{out} is a directory; a .gguf out must be a file (remove the directory first)")
    # float32 weights in: each matrix is rounded once, to the type written
    loaded = load_path(src, dtype="float32", cpu_kernels=False, gguf_on_device="float")
    write_gguf(loaded, get_architecture(loaded.config).GGUF, out, dtype=dtype, q_bits=q_bits, progress=progress)
    return out


def write_hf_dir(
    loaded: LoadedModel,
    out: Path,
    quantization: dict[str, int] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Write a loaded model as an HF directory into the existing directory ``out``."""
    weights = dict(tree_flatten(loaded.model.parameters()))
    total = len(weights)
    for i, (name, w) in enumerate(weights.items()):
        mx.eval(w)
        if progress:
            progress(i + 1, total)
        weights[name] = w
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(_config(loaded, weights, quantization), indent=2))
    _write_tokenizer(loaded.tokenizer, out)
    eos = sorted(loaded.tokenizer.eos_token_ids)
    gen = dict(loaded.generation_config)
    gen["eos_token_id"] = eos if len(eos) != 1 else eos[0]
    if loaded.tokenizer.bos_token_id is not None:
        gen["bos_token_id"] = loaded.tokenizer.bos_token_id
    if loaded.tokenizer.pad_token_id is not None:
        gen["pad_token_id"] = loaded.tokenizer.pad_token_id
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))


def _config(loaded: LoadedModel, weights: dict[str, mx.array], quantization: dict[str, int] | None) -> dict[str, Any]:
    config = dict(loaded.config)
    config["architectures"] = [get_architecture(config).HF_ARCHITECTURE]
    floats = sorted({str(w.dtype).split(".")[-1] for w in weights.values() if mx.issubdtype(w.dtype, mx.floating)})
    config["torch_dtype"] = floats[0] if len(floats) == 1 else "float32"
    if quantization:
        config["quantization"] = dict(quantization)
    else:
        config.pop("quantization", None)
    return config


def _write_tokenizer(tokenizer: Tokenizer, out: Path) -> None:
    backend = TokenizerBackend.from_str(tokenizer.backend.to_str())  # a copy: the model's stays as it is
    bos = tokenizer.bos_token
    add_bos = bool(tokenizer.add_bos_token) and bos is not None
    if add_bos:
        # Other HF tools take BOS from the post-processor; ours reads add_bos_token.
        bos_id = tokenizer.bos_token_id
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    backend.save(str(out / "tokenizer.json"))
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos if isinstance(eos := tokenizer.eos_token, str) or eos is None else backend.id_to_token(eos),
        "pad_token": tokenizer.pad_token,
        "add_bos_token": add_bos,
        "add_eos_token": False,
    }
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))

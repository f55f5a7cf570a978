"""``lmx convert``: a GGUF file or HF directory -> an HF-layout directory, written atomically."""

from __future__ import annotations

import contextlib
import ctypes
import glob
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from tokenizers import Tokenizer as TokenizerBackend
from tokenizers import processors

from lmx.errors import InvalidOptionError, LmxError, SaveError
from lmx.loading.loader import DTYPES, LoadedModel, load_path
from lmx.models import get_architecture
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
    """Convert ``src`` (GGUF file or HF dir) to an HF-layout directory at ``out``.

    The directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
    generation_config.json) is built in a temporary sibling and renamed into place, so an
    interrupted conversion leaves no half-written ``out``.

    Args:
        src: the model to read.
        out: the directory to create.
        dtype: float32, bfloat16 or float16 for the (non-quantized) weights.
        q_bits: 4 or 8 to store Linear/Embedding weights MLX-quantized (affine), else None.
        q_group_size: quantization group size (32, 64 or 128).
        overwrite: replace an existing ``out``.
        progress: called as ``progress(done, total)`` while tensors are written.

    Returns:
        The output directory.

    Raises:
        InvalidOptionError: a bad dtype, bit width or group size, or ``out`` exists.
        and the load errors of :func:`lmx.load`.
    """
    if dtype not in DTYPES:
        raise InvalidOptionError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if q_bits is not None and q_bits not in Q_BITS:
        raise InvalidOptionError(f"q_bits must be one of {Q_BITS}, got {q_bits!r}")
    if q_group_size not in Q_GROUP_SIZES:
        raise InvalidOptionError(f"q_group_size must be one of {Q_GROUP_SIZES}, got {q_group_size!r}")
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise InvalidOptionError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    loaded = load_path(src, dtype=dtype, cpu_kernels=False)  # writes float weights: no GGUF blocks
    quant = None
    if q_bits is not None:
        quant = {"group_size": q_group_size, "bits": q_bits}
        nn.quantize(loaded.model, group_size=q_group_size, bits=q_bits)
    with staged_dir(out) as tmp:
        write_hf_dir(loaded, tmp, quant or loaded.quantization, progress)
    return out


@contextlib.contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """Write a directory so that ``out`` is either untouched or wholly replaced.

    Yields a hidden temporary directory beside ``out``; when the block ends without an
    error it replaces ``out`` (:func:`replace_dir`), otherwise it is removed. A process
    killed inside the block leaves ``out`` as it was (and a hidden ``.out.tmp-*`` beside it).

    Raises:
        SaveError: writing failed (a full disk, no permission...); ``out`` is unchanged.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary directory
    try:
        try:
            yield tmp
            replace_dir(tmp, out)
        except (OSError, RuntimeError) as e:  # MLX reports a failed write as RuntimeError
            if isinstance(e, LmxError):
                raise
            raise SaveError(f"writing {out} failed ({e}); {out} is unchanged") from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sweep_stale(out: Path) -> None:
    """Remove the hidden temporaries a killed save of ``out`` left beside it.

    Temporaries are named ``.<out>.tmp-<pid>-*`` (and ``.<out>.old-<pid>``); those of a
    process that no longer runs are removed, those of a running one (a save in progress) kept.
    """
    for stale in out.parent.glob(f".{glob.escape(out.name)}.*"):
        kind, _, rest = stale.name[len(out.name) + 2 :].partition("-")
        pid = rest.partition("-")[0]
        stale_dir = stale.is_dir() and not stale.is_symlink()
        if kind in ("tmp", "old") and pid.isdigit() and stale_dir and not _running(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished directory ``tmp`` to ``out``, replacing an existing ``out`` atomically.

    Two renames (``out`` aside, ``tmp`` in) leave a moment with no ``out`` at all; a process
    killed then loses the old directory. Linux (``renameat2(RENAME_EXCHANGE)``) and macOS
    (``renamex_np(RENAME_SWAP)``) swap two directories in one step; elsewhere, or on a file
    system that cannot, the two renames are the fallback. ``tmp`` is gone afterwards.
    """
    if not out.exists():
        tmp.rename(out)
        return
    if _swap(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old directory
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _swap(a: Path, b: Path) -> bool:
    """Exchange two paths atomically; False when the platform or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if sys.platform.startswith("linux"):
            at_fdcwd, rename_exchange = -100, 2
            fn = libc.renameat2
            args: tuple = (at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
        elif sys.platform == "darwin":
            rename_swap = 2
            fn = libc.renamex_np
            args = (os.fsencode(a), os.fsencode(b), rename_swap)
        else:
            return False
    except (OSError, AttributeError):  # no such C function in this libc
        return False
    return fn(*args) == 0


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

"""Atomic saves: the one place lmx writes a file or a directory so that a crash, a full disk or a
read-only file system leaves the old output exactly as it was.

* :func:`staged_file` yields a hidden temporary path beside the target and renames it over the
  target (``os.replace``) when the block ends cleanly;
* :func:`staged_dir` does the same for a whole directory, swapping it in atomically where the
  platform can (:func:`replace_dir`);
* :func:`write_bytes` is :func:`staged_file` for bytes already in memory.

Every failure to write (``OSError``, and the ``RuntimeError`` MLX raises when its own writer
fails) becomes a :class:`~lmx.errors.SaveError` naming the output and saying it is unchanged.
Temporaries are named ``.<name>.tmp-<pid>-*`` so that :func:`sweep_stale` can tell those of a
killed save (removed by the next save) from those of one still running (kept).
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lmx.errors import LmxError, SaveError

# What a failed write raises: the OS's errors, and MLX's RuntimeError from its own file writer
# (mx.save_safetensors on a full disk). Both mean "the output could not be written".
WRITE_ERRORS = (OSError, RuntimeError)


@contextlib.contextmanager
def _typed(out: Path) -> Iterator[None]:
    """Turn a write failure inside the block into a :class:`SaveError` about ``out``."""
    try:
        yield
    except WRITE_ERRORS as e:
        if isinstance(e, LmxError):
            raise
        raise SaveError(f"writing {out} failed ({e}); {out} is unchanged") from e


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _remove(path: Path) -> None:
    """Remove ``path`` whatever it is (a directory tree, a file, a symlink: never its target)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _prepare_parent(out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(out)


@contextlib.contextmanager
def staged_file(path: str | os.PathLike) -> Iterator[Path]:
    """Write one file so that ``path`` is either untouched or wholly replaced.

    Yields a hidden temporary path in the same directory (ending in ``path``'s suffix, so writers
    that add a missing extension, like ``mx.save_safetensors``, write exactly there). When the
    block ends without an error the temporary replaces ``path``; otherwise it is removed.

    Raises:
        SaveError: the file could not be written (read-only file system, no permission, full
            disk...); ``path`` is unchanged.
    """
    out = Path(path)
    with _typed(out):
        _prepare_parent(out)
        fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.tmp-{os.getpid()}-", suffix=out.suffix)
        os.close(fd)
        tmp = Path(name)
        tmp.chmod(0o666 & ~_umask())  # mkstemp makes it private; the result is an ordinary file
    try:
        with _typed(out):
            yield tmp
            os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (synced before the rename); return the path.

    Raises:
        SaveError: as :func:`staged_file`.
    """
    out = Path(path)
    with staged_file(out) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return out


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Write a directory so that ``out`` is either untouched or wholly replaced.

    Yields a hidden temporary directory beside ``out``; when the block ends without an error it
    replaces ``out`` (:func:`replace_dir`, whatever ``out`` was: a directory, a file or a symlink),
    otherwise it is removed. A process killed inside the block leaves ``out`` as it was (and a
    hidden ``.out.tmp-*`` beside it, which the next save of ``out`` removes).

    Raises:
        SaveError: writing failed (a full disk, no permission, a read-only file system...);
            ``out`` is unchanged.
    """
    out = Path(out)
    with _typed(out):
        _prepare_parent(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary directory
    try:
        with _typed(out):
            yield tmp
            replace_dir(tmp, out)
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
        if kind in ("tmp", "old") and pid.isdigit() and not _running(int(pid)):
            _remove(stale)


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
    (``renamex_np(RENAME_SWAP)``) swap two paths in one step; elsewhere, or on a file system
    that cannot, the two renames are the fallback. ``tmp`` is gone afterwards, and so is the old
    ``out`` (a directory, a file or a symlink, which is removed, not followed).
    """
    if not os.path.lexists(out):
        tmp.rename(out)
        return
    if _swap(tmp, out):
        _remove(tmp)  # now the old output
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    out.rename(old)
    tmp.rename(out)
    _remove(old)


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

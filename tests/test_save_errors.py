"""Saves that cannot be written are a typed ``SaveError`` naming the output and saying it is unchanged,
and ``convert --overwrite`` replaces whatever ``out`` was (a file, a symlink) without leaving it behind.

The read-only cases write onto a real read-only file system (a tmpfs remounted ``ro``: EROFS, which
root cannot write through, unlike a ``chmod``-ed directory), onto ``/sys`` (EPERM even for root) and
below a file (ENOTDIR). The full-disk cases are in ``test_atomic_writes.py`` (``diskfull``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import lmx  # isort: skip
import mlx.optimizers as optim

from lmx.errors import SaveError
from lmx.loading import load_model
from lmx.loading.convert import convert
from lmx.train.checkpoint import save_checkpoint
from lmx.train.fuse import fuse
from lmx.train.lora import apply_lora, read_adapter_config, save_adapter


def hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@contextlib.contextmanager
def read_only(folder: Path, fill: Callable[[Path], object]) -> Iterator[Path]:
    """A tmpfs at ``folder``, filled by ``fill`` and then remounted read-only."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "lmx-test", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root: {mounted.stderr.decode().strip()}")
    try:
        fill(folder)
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def assert_save_error(caught: pytest.ExceptionInfo[SaveError], out: Path, *errnos: int) -> None:
    message = str(caught.value)
    assert message.startswith(f"writing {out} failed (") and message.endswith(f"{out} is unchanged"), message
    cause = caught.value.__cause__
    assert isinstance(cause, OSError) and cause.errno in errnos, repr(cause)


@pytest.fixture(scope="module")
def adapter(tiny_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = load_model(tiny_dirs["qwen3"]).model
    config = apply_lora(model, rank=4, alpha=8.0, targets=("q_proj", "v_proj"), seed=1)
    return save_adapter(model, tmp_path_factory.mktemp("adapter") / "a", config)


def test_convert_and_fuse_onto_a_read_only_file_system(
    tiny_dirs: dict[str, Path], tmp_path: Path, adapter: Path
) -> None:
    def fill(root: Path) -> None:
        convert(tiny_dirs["qwen3"], root / "converted")
        fuse(tiny_dirs["qwen3"], adapter, root / "fused")

    with read_only(tmp_path / "ro", fill) as root:
        before = {name: hashes(root / name) for name in ("converted", "fused")}
        with pytest.raises(SaveError) as caught:
            convert(tiny_dirs["qwen3"], root / "converted", dtype="bfloat16", overwrite=True)
        assert_save_error(caught, root / "converted", errno.EROFS)
        with pytest.raises(SaveError) as caught:
            fuse(tiny_dirs["qwen3"], adapter, root / "fused", overwrite=True)
        assert_save_error(caught, root / "fused", errno.EROFS)
        with pytest.raises(SaveError) as caught:
            convert(tiny_dirs["qwen3"], root / "new")
        assert_save_error(caught, root / "new", errno.EROFS)
        assert {name: hashes(root / name) for name in before} == before
        assert sorted(p.name for p in root.iterdir()) == ["converted", "fused"]
        with lmx.load(root / "converted") as engine:
            assert len(engine.generate([2, 3], max_tokens=2).tokens) == 2


def test_adapter_and_checkpoint_onto_a_read_only_file_system(
    tiny_dirs: dict[str, Path], tmp_path: Path, adapter: Path
) -> None:
    model = load_model(tiny_dirs["qwen3"]).model
    config = apply_lora(model, rank=4, alpha=8.0, targets=("q_proj", "v_proj"), seed=2)
    optimizer = optim.AdamW(learning_rate=1e-3)

    def fill(root: Path) -> None:
        save_adapter(model, root / "adapter", config)
        save_checkpoint(root / "adapter", 1, model, optimizer, config, {"note": "old"})

    with read_only(tmp_path / "ro", fill) as root:
        before = hashes(root)
        with pytest.raises(SaveError) as caught:
            save_adapter(model, root / "adapter", config)
        assert_save_error(caught, root / "adapter" / "adapters.safetensors", errno.EROFS)
        with pytest.raises(SaveError) as caught:
            save_checkpoint(root / "adapter", 2, model, optimizer, config, {"note": "new"})
        assert_save_error(
            caught, root / "adapter" / "checkpoints" / "step-000002" / "adapters.safetensors", errno.EROFS
        )
        assert hashes(root) == before
        assert read_adapter_config(root / "adapter").rank == 4


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/sys is Linux's")
def test_saves_where_nothing_can_be_written(tiny_dirs: dict[str, Path], tmp_path: Path, adapter: Path) -> None:
    model = load_model(tiny_dirs["qwen3"]).model
    config = apply_lora(model, rank=4, alpha=8.0, targets=("q_proj", "v_proj"))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cases: list[tuple[Path, tuple[int, ...]]] = [
        (Path("/sys/lmx-test-out"), (errno.EPERM, errno.EACCES, errno.EROFS)),  # sysfs: no new entries, even for root
        (blocker / "out", (errno.ENOTDIR, errno.EEXIST)),  # a file where a directory is expected
    ]
    for out, codes in cases:
        with pytest.raises(SaveError) as caught:
            convert(tiny_dirs["qwen3"], out)
        assert_save_error(caught, out, *codes)
        with pytest.raises(SaveError) as caught:
            fuse(tiny_dirs["qwen3"], adapter, out)
        assert_save_error(caught, out, *codes)
        with pytest.raises(SaveError) as caught:
            save_adapter(model, out, config)
        assert_save_error(caught, out / "adapters.safetensors", *codes)
    assert blocker.read_text() == "not a directory"


@pytest.mark.parametrize("kind", ["file", "symlink to a directory", "symlink to a file", "dangling symlink"])
def test_convert_overwrite_replaces_a_file_or_symlink(tiny_dirs: dict[str, Path], tmp_path: Path, kind: str) -> None:
    parent = tmp_path / "models"
    parent.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("the link's target")
    out = parent / "out"
    if kind == "file":
        out.write_text("old file")
    elif kind == "symlink to a directory":
        out.symlink_to(elsewhere)
    elif kind == "symlink to a file":
        out.symlink_to(elsewhere / "keep.txt")
    else:
        out.symlink_to(tmp_path / "missing")
    convert(tiny_dirs["qwen3"], out, overwrite=True)
    assert out.is_dir() and not out.is_symlink()
    assert sorted(os.listdir(parent)) == ["out"], "the old output was left behind as a hidden temporary"
    assert (elsewhere / "keep.txt").read_text() == "the link's target"  # a link is replaced, never followed
    with lmx.load(out) as engine:
        assert len(engine.generate([2, 3], max_tokens=2).tokens) == 2

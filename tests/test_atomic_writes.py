"""Saves survive being killed: convert, fuse, adapter and checkpoint writes.

A child process overwrites an existing output and is killed part-way by a real signal:

* ``fsize``: ``RLIMIT_FSIZE`` makes the kernel send SIGXFSZ in the middle of writing a file
  (Python ignores SIGXFSZ; the child restores the default action, so the signal kills it);
* ``diskfull``: the same limit with SIGXFSZ ignored, so the write fails like a full disk;
* ``progress``: SIGKILL from inside convert's progress callback, between two tensors;
* ``sigint``: Ctrl-C (KeyboardInterrupt) between two tensors, so cleanup code runs;
* ``event:N``: SIGKILL at the N-th file-system step after the data is written (a rename,
  a directory swap, a removal: Python audit events), for every N until the save completes.

After each kill the output must be the complete old version or the complete new one (per
file, compared by hash), still load, and nothing but hidden temporary entries may be left
beside it. The steps are counted, not timed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import lmx  # isort: skip
import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from lmx.loading import load_model
from lmx.loading.convert import convert
from lmx.train.checkpoint import load_checkpoint, restore, save_checkpoint
from lmx.train.fuse import fuse
from lmx.train.lora import apply_lora, load_adapter, read_adapter_config, save_adapter

pytestmark = pytest.mark.slow  # child processes

CHILD = r'''
import os, resource, signal, sys
from pathlib import Path

kind, kill, *args = sys.argv[1:]
import lmx
import mlx.core as mx
import mlx.optimizers as optim
from lmx.loading import load_model

EVENTS = {"os.rename", "shutil.rmtree", "os.remove", "os.rmdir", "ctypes.call_function"}


def die(sig=signal.SIGKILL):
    os.kill(os.getpid(), sig)


def arm():
    """Arm the kill; called right before the save starts."""
    mode, _, n = kill.partition(":")
    if mode in ("fsize", "diskfull"):
        if mode == "fsize":
            signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(n), int(n)))
    elif mode == "sigint":
        # Ctrl-C raises KeyboardInterrupt only where SIGINT is not ignored; a test runner started in
        # the background (a CI job, `make test &`) passes SIG_IGN on to its children.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    elif mode == "event":
        seen = [0]

        def hook(event, _args):
            if event in EVENTS:
                seen[0] += 1
                if seen[0] == int(n):
                    die()

        sys.addaudithook(hook)


def progress(done, total):
    mode, _, n = kill.partition(":")
    if mode == "progress" and done == int(n):
        die()
    if mode == "sigint" and done == int(n):
        die(signal.SIGINT)


if kind == "convert":
    from lmx.loading.convert import convert

    src, out, dtype = args
    from lmx.loading import load_model as _warm  # imports done before arming

    arm()
    convert(src, out, dtype=dtype, overwrite=True, progress=progress)
elif kind == "fuse":
    from lmx.train.fuse import fuse

    base, adapter, out = args
    arm()
    fuse(base, adapter, out, overwrite=True)
elif kind == "adapter":
    from lmx.train.lora import load_adapter, read_adapter_config, save_adapter

    base, new_adapter, target = args
    model = load_model(base).model
    load_adapter(model, new_adapter)
    config = read_adapter_config(new_adapter)
    arm()
    save_adapter(model, target, config)
elif kind == "checkpoint":
    from lmx.train.checkpoint import load_checkpoint, restore, save_checkpoint
    from lmx.train.lora import apply_lora

    base, reference, target = args
    model = load_model(base).model
    config = apply_lora(model, rank=4, alpha=8.0, targets=("q_proj", "v_proj"))
    optimizer = optim.AdamW(learning_rate=1e-3)
    checkpoint = load_checkpoint(reference)
    restore(checkpoint, model, optimizer)
    arm()
    save_checkpoint(target, checkpoint.step, model, optimizer, config, {"note": "new"})
'''


def run_child(tmp_path: Path, kind: str, kill: str, *args: str | Path) -> int:
    """Run one save in a child process; return its exit status (negative: killed by that signal).

    The child's stderr is left in ``tmp_path / "child.stderr"``.
    """
    script = tmp_path / "child.py"
    if not script.exists():
        script.write_text(CHILD)
    done = subprocess.run(
        [sys.executable, str(script), kind, kill, *map(str, args)], capture_output=True, text=True, timeout=300
    )
    (tmp_path / "child.stderr").write_text(done.stderr)
    if done.returncode not in (0, -signal.SIGKILL, -signal.SIGXFSZ, -signal.SIGINT, 1):
        pytest.fail(f"child {kind} {kill} ended with {done.returncode}: {done.stderr[-2000:]}")
    if done.returncode == 1 and kill.partition(":")[0] != "diskfull":
        pytest.fail(f"child {kind} {kill} failed: {done.stderr[-2000:]}")
    return done.returncode


def hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` by relative path, hidden temporaries left out."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    }


def strays(parent: Path, keep: set[str]) -> list[str]:
    """Entries of ``parent`` other than ``keep`` that are not hidden temporaries."""
    return sorted(p.name for p in parent.iterdir() if p.name not in keep and not p.name.startswith("."))


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------------------ convert


@pytest.fixture(scope="module")
def converted(tiny_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """The file hashes of the old (float32) and the new (bfloat16) conversion of the tiny Qwen 3."""
    folder = tmp_path_factory.mktemp("reference")
    old = convert(tiny_dirs["qwen3"], folder / "old", dtype="float32")
    new = convert(tiny_dirs["qwen3"], folder / "new", dtype="bfloat16")
    return {"old": hashes(old), "new": hashes(new)}


def fresh_out(tiny_dirs: dict[str, Path], tmp_path: Path) -> Path:
    """A directory holding only ``out``, the old (float32) conversion."""
    parent = tmp_path / "models"
    parent.mkdir()
    return convert(tiny_dirs["qwen3"], parent / "out", dtype="float32")


def assert_whole(out: Path, versions: dict[str, dict[str, str]]) -> str:
    """``out`` is exactly one complete version and loads; return which."""
    assert out.is_dir(), f"{out} is gone: neither the old nor the new version is in place"
    got = hashes(out)
    matches = [name for name, files in versions.items() if files == got]
    assert matches, f"{out} is a mix or half-written: {sorted(got)}"
    with lmx.load(out) as engine:
        assert len(engine.generate([2, 3], max_tokens=2).tokens) == 2
    return matches[0]


@pytest.mark.parametrize("kill", ["fsize:65536", "progress:3", "sigint:3"])
def test_convert_killed_mid_write_keeps_the_old_dir(
    tiny_dirs: dict[str, Path], tmp_path: Path, converted: dict[str, dict[str, str]], kill: str
) -> None:
    out = fresh_out(tiny_dirs, tmp_path)
    status = run_child(tmp_path, "convert", kill, tiny_dirs["qwen3"], out, "bfloat16")
    expected = {"fsize": -signal.SIGXFSZ, "progress": -signal.SIGKILL, "sigint": -signal.SIGINT}
    assert status == expected[kill.split(":")[0]]
    assert assert_whole(out, converted) == "old"
    assert strays(out.parent, {"out"}) == []
    if kill.startswith("sigint"):
        assert hidden(out.parent) == []  # an interrupt (not a kill) cleans its temporary directory up
    # The next conversion goes through over whatever the killed one left, and sweeps it away.
    convert(tiny_dirs["qwen3"], out, dtype="bfloat16", overwrite=True)
    assert assert_whole(out, converted) == "new"
    assert hidden(out.parent) == []


def test_convert_keeps_the_temporaries_of_a_running_save(
    tiny_dirs: dict[str, Path], tmp_path: Path, converted: dict[str, dict[str, str]]
) -> None:
    out = fresh_out(tiny_dirs, tmp_path)
    with subprocess.Popen([sys.executable, "-c", "pass"]) as gone:
        gone.wait()
    dead = out.parent / f".out.tmp-{gone.pid}-abc"
    live = out.parent / f".out.tmp-{os.getpid()}-abc"  # this process: "a save in progress"
    other = out.parent / f".other.tmp-{gone.pid}-abc"  # another output's: not ours to remove
    for d in (dead, live, other):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    convert(tiny_dirs["qwen3"], out, dtype="bfloat16", overwrite=True)
    assert assert_whole(out, converted) == "new"
    assert hidden(out.parent) == sorted([live.name, other.name])


def test_convert_on_a_full_disk_keeps_the_old_dir(
    tiny_dirs: dict[str, Path], tmp_path: Path, converted: dict[str, dict[str, str]]
) -> None:
    out = fresh_out(tiny_dirs, tmp_path)
    assert run_child(tmp_path, "convert", "diskfull:65536", tiny_dirs["qwen3"], out, "bfloat16") == 1
    # A typed error naming the output and saying it is unchanged, not MLX's RuntimeError.
    last = (tmp_path / "child.stderr").read_text().strip().splitlines()[-1]
    assert last.startswith("lmx.errors.SaveError: writing ") and "is unchanged" in last, last
    assert assert_whole(out, converted) == "old"
    assert strays(out.parent, {"out"}) == [] and hidden(out.parent) == []


def kill_at_every_step(run: Callable[[int], int], check: Callable[[], str | int]) -> list[str | int]:
    """Run the save killed at its 1st, 2nd, ... file-system step until a run completes.

    ``run(n)`` restores the old state, runs the child with ``event:n`` and returns its status;
    ``check()`` validates what is on disk and says which version it is.
    """
    seen = []
    for n in range(1, 20):
        status = run(n)
        seen.append(check())
        if status == 0:
            assert n > 1, "no file-system step was seen after the data was written"
            return seen
        assert status == -signal.SIGKILL
    pytest.fail(f"the save never completed; versions seen: {seen}")


def test_convert_killed_at_every_step_of_the_swap(
    tiny_dirs: dict[str, Path], tmp_path: Path, converted: dict[str, dict[str, str]]
) -> None:
    out = fresh_out(tiny_dirs, tmp_path)
    snapshot = tmp_path / "snapshot"
    shutil.copytree(out, snapshot)

    def run(n: int) -> int:
        for entry in out.parent.iterdir():
            shutil.rmtree(entry)
        shutil.copytree(snapshot, out)
        return run_child(tmp_path, "convert", f"event:{n}", tiny_dirs["qwen3"], out, "bfloat16")

    def check() -> str:
        assert strays(out.parent, {"out"}) == []
        return assert_whole(out, converted)

    seen = kill_at_every_step(run, check)
    assert seen[-1] == "new"


# --------------------------------------------------------------------------------------------- fuse


@pytest.fixture(scope="module")
def adapters(tiny_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two different LoRA adapters (old, new) for the tiny Qwen 3."""
    folder = tmp_path_factory.mktemp("adapters")
    out = {}
    for name, seed in (("old", 1), ("new", 2)):
        model = load_model(tiny_dirs["qwen3"]).model
        config = apply_lora(model, rank=4, alpha=8.0, targets=("q_proj", "v_proj"), seed=seed)
        key = mx.random.key(seed)
        updates = [(k, mx.random.normal(v.shape, key=key) * 0.1) for k, v in tree_flatten(model.trainable_parameters())]
        model.load_weights(updates, strict=False)
        out[name] = save_adapter(model, folder / name, config)
    return out


def test_fuse_killed_keeps_the_old_dir(tiny_dirs: dict[str, Path], tmp_path: Path, adapters: dict[str, Path]) -> None:
    parent = tmp_path / "models"
    parent.mkdir()
    out = fuse(tiny_dirs["qwen3"], adapters["old"], parent / "out")
    reference = tmp_path / "reference"
    reference.mkdir()
    versions = {
        "old": hashes(out),
        "new": hashes(fuse(tiny_dirs["qwen3"], adapters["new"], reference / "out")),
    }
    assert versions["old"] != versions["new"]
    assert run_child(tmp_path, "fuse", "fsize:65536", tiny_dirs["qwen3"], adapters["new"], out) == -signal.SIGXFSZ
    assert assert_whole(out, versions) == "old"
    snapshot = tmp_path / "snapshot"
    shutil.copytree(out, snapshot)

    def run(n: int) -> int:
        for entry in parent.iterdir():
            shutil.rmtree(entry)
        shutil.copytree(snapshot, out)
        return run_child(tmp_path, "fuse", f"event:{n}", tiny_dirs["qwen3"], adapters["new"], out)

    def check() -> str:
        assert strays(parent, {"out"}) == []
        return assert_whole(out, versions)

    assert kill_at_every_step(run, check)[-1] == "new"


# ------------------------------------------------------------------------------------------ adapter


def test_adapter_save_killed_keeps_each_file(
    tiny_dirs: dict[str, Path], tmp_path: Path, adapters: dict[str, Path]
) -> None:
    target = tmp_path / "adapter"
    shutil.copytree(adapters["old"], target)
    old, new = hashes(adapters["old"]), hashes(adapters["new"])

    def check() -> str:
        got = hashes(target)
        assert sorted(got) == sorted(old)
        for name, digest in got.items():
            assert digest in (old[name], new[name]), f"{name} is half-written"
        model = load_model(tiny_dirs["qwen3"]).model
        load_adapter(model, target)
        assert strays(target, set(old)) == []
        return "old" if got == old else "new" if got == new else "mixed"

    assert run_child(tmp_path, "adapter", "fsize:4096", tiny_dirs["qwen3"], adapters["new"], target) == -signal.SIGXFSZ
    assert check() == "old"

    def run(n: int) -> int:
        shutil.rmtree(target)
        shutil.copytree(adapters["old"], target)
        return run_child(tmp_path, "adapter", f"event:{n}", tiny_dirs["qwen3"], adapters["new"], target)

    # Each file is replaced atomically; the pair is not (see docs/reliability.md): a kill
    # between the two replacements leaves the new weights beside the old config.
    seen = kill_at_every_step(run, check)
    assert seen[0] == "old" and seen[-1] == "new"
    assert read_adapter_config(target) == read_adapter_config(adapters["new"])


def assert_save_error_in_child(tmp_path: Path) -> None:
    """The child died of a ``SaveError`` naming the output and saying it is unchanged (not MLX's
    RuntimeError, not a bare OSError)."""
    last = (tmp_path / "child.stderr").read_text().strip().splitlines()[-1]
    assert last.startswith("lmx.errors.SaveError: writing ") and last.endswith("is unchanged"), last


def test_adapter_save_on_a_full_disk_is_a_save_error(
    tiny_dirs: dict[str, Path], tmp_path: Path, adapters: dict[str, Path]
) -> None:
    target = tmp_path / "adapter"
    shutil.copytree(adapters["old"], target)
    assert run_child(tmp_path, "adapter", "diskfull:4096", tiny_dirs["qwen3"], adapters["new"], target) == 1
    assert_save_error_in_child(tmp_path)
    assert hashes(target) == hashes(adapters["old"]) and hidden(target) == []


# --------------------------------------------------------------------------------------- checkpoint


def make_checkpoint(base: Path, adapter: Path, root: Path, step: int) -> dict[str, mx.array]:
    """Save a checkpoint of ``adapter`` with a stepped optimizer; return its adapter tensors."""
    model = load_model(base).model
    load_adapter(model, adapter)
    model.freeze()
    for _, layer in model.named_modules():
        if hasattr(layer, "lora_a"):
            layer.unfreeze(keys=["lora_a", "lora_b"])
    optimizer = optim.AdamW(learning_rate=1e-3)
    optimizer.init(model.trainable_parameters())
    grads = model.trainable_parameters()
    optimizer.update(model, grads)
    config = read_adapter_config(adapter)
    save_checkpoint(root, step, model, optimizer, config, {"note": f"step {step}"})
    return load_checkpoint(root).adapters


def test_checkpoint_save_killed_keeps_a_whole_checkpoint(
    tiny_dirs: dict[str, Path], tmp_path: Path, adapters: dict[str, Path]
) -> None:
    base = tiny_dirs["qwen3"]
    target, reference = tmp_path / "run", tmp_path / "reference"
    old = make_checkpoint(base, adapters["old"], target, step=1)
    new = make_checkpoint(base, adapters["new"], reference, step=2)
    snapshot = tmp_path / "snapshot"
    shutil.copytree(target, snapshot)

    def loaded_step() -> int:
        checkpoint = load_checkpoint(target)
        want = old if checkpoint.step == 1 else new
        assert sorted(checkpoint.adapters) == sorted(want)
        for name, value in checkpoint.adapters.items():
            assert mx.array_equal(value, want[name]).item(), name
        model = load_model(base).model
        apply_lora(model, rank=4, alpha=8.0, targets=("q_proj", "v_proj"))
        restore(checkpoint, model, optim.AdamW(learning_rate=1e-3))
        return checkpoint.step

    status = run_child(tmp_path, "checkpoint", "fsize:4096", base, reference, target)
    assert status == -signal.SIGXFSZ
    assert loaded_step() == 1
    # A full disk (the write fails instead of killing): a SaveError, the old checkpoint in force.
    assert run_child(tmp_path, "checkpoint", "diskfull:4096", base, reference, target) == 1
    assert_save_error_in_child(tmp_path)
    assert loaded_step() == 1

    def run(n: int) -> int:
        shutil.rmtree(target)
        shutil.copytree(snapshot, target)
        return run_child(tmp_path, "checkpoint", f"event:{n}", base, reference, target)

    steps = kill_at_every_step(run, loaded_step)
    assert steps[0] == 1 and steps[-1] == 2 and steps == sorted(steps)

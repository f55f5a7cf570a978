"""Build the CPU kernels (``lmx.kernels._lmx_kernels``) against the installed MLX: ``python -m lmx.kernels.build``.

`make run`/`make test`/`make kernels` run this after installing lmx. It needs cmake, a C++20 compiler and the
``nanobind`` package (the version MLX's own bindings were built with); without them it says what is
missing and exits 0: lmx then runs on the float32 path. The module lands next to this file with a
stamp (MLX version, source hash) that :mod:`lmx.kernels` checks before importing it, so a module built
for another MLX is never loaded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SOURCES = HERE / "csrc"
STAMP = HERE / "_lmx_kernels.json"
MODULE_NAME = "_lmx_kernels"


def module_path() -> Path:
    """Where the built module lives (``_lmx_kernels.<python tag>.so`` next to this file)."""
    return HERE / f"{MODULE_NAME}{sysconfig.get_config_var('EXT_SUFFIX')}"


def source_hash() -> str:
    """A hash of the C++ sources and CMakeLists, so edited sources are rebuilt, never half-used."""
    h = hashlib.sha256()
    for path in sorted(SOURCES.iterdir()):
        if path.is_file():
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def expected_stamp() -> dict[str, str]:
    """What the stamp of an up-to-date module says."""
    import mlx.core as mx

    return {"mlx": mx.__version__, "sources": source_hash(), "python": sysconfig.get_config_var("EXT_SUFFIX")}


def supported_platform() -> str | None:
    """None when this platform gets the kernels, else why not."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"the CPU kernels are built on Linux x86_64 only (this is {sys.platform} {platform.machine()})"
    return None


def build(*, jobs: int = 1, verbose: bool = False) -> Path:
    """Configure and build with CMake, then install the module and its stamp next to this file.

    Raises:
        RuntimeError: a tool is missing or the build failed (the message says which).
    """
    if (why := supported_platform()) is not None:
        raise RuntimeError(why)
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not found (Debian/Ubuntu: apt-get install cmake g++)")
    include = Path(sysconfig.get_paths()["include"])
    if not (include / "Python.h").is_file():
        raise RuntimeError(
            f"the Python headers are missing ({include}/Python.h; Debian/Ubuntu: apt-get install python3-dev)"
        )
    try:
        import nanobind  # noqa: F401
    except ImportError as e:
        raise RuntimeError("the Python package nanobind is not installed (pip install nanobind)") from e
    stamp = expected_stamp()
    out = subprocess.PIPE if not verbose else None
    with tempfile.TemporaryDirectory(prefix="lmx-kernels-") as tmp:
        configure = ["cmake", "-S", str(SOURCES), "-B", tmp, f"-DPython_EXECUTABLE={sys.executable}"]
        for cmd in (configure, ["cmake", "--build", tmp, f"-j{jobs}"]):
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, check=False)
            if proc.returncode:
                tail = (proc.stdout or "")[-4000:]
                raise RuntimeError(f"{' '.join(cmd[:2])} failed (exit {proc.returncode}):\n{tail}")
        built = list(Path(tmp).glob(f"{MODULE_NAME}*.so"))
        if len(built) != 1:
            raise RuntimeError(f"the build produced {len(built)} modules named {MODULE_NAME}*.so in {tmp}")
        target = module_path()
        tmp_target = target.with_name(target.name + ".tmp")
        shutil.copyfile(built[0], tmp_target)
        tmp_target.replace(target)
    STAMP.write_text(json.dumps(stamp, indent=1) + "\n")
    return target


def main(argv: list[str] | None = None) -> int:
    """Build; on failure say why and return 0 (lmx runs without the kernels) unless ``--strict``."""
    parser = argparse.ArgumentParser(prog="python -m lmx.kernels.build", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", "-j", type=int, default=1, help="parallel compile jobs (default 1)")
    parser.add_argument("--verbose", action="store_true", help="show the compiler's output")
    parser.add_argument("--strict", action="store_true", help="exit 1 when the build fails")
    parser.add_argument("--if-needed", action="store_true", help="do nothing when an up-to-date module exists")
    args = parser.parse_args(argv)
    if (why := supported_platform()) is not None:
        print(f"lmx: {why}; using MLX's float32 path", file=sys.stderr)
        return 0
    if args.if_needed and module_path().is_file() and STAMP.is_file():
        try:
            if json.loads(STAMP.read_text()) == expected_stamp():
                return 0
        except (OSError, ValueError):
            pass
    start = time.perf_counter()
    print("lmx: building the CPU kernels (C++, about a minute)...", file=sys.stderr)
    try:
        path = build(jobs=args.jobs, verbose=args.verbose)
    except RuntimeError as e:
        print(f"lmx: could not build the CPU kernels: {e}\nlmx: running on MLX's float32 path instead", file=sys.stderr)
        return 1 if args.strict else 0
    print(f"lmx: built {path} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

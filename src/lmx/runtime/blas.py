"""Route MLX's CPU BLAS calls to OpenBLAS on Linux.

The Linux ``mlx[cpu]`` wheel links a reference (netlib) BLAS that runs an fp32 matmul at
about 2 GFLOP/s. Loading OpenBLAS with global symbol visibility *before* ``mlx.core`` is
first imported makes the dynamic linker resolve MLX's ``cblas_*`` symbols to OpenBLAS
(about 100x faster here). This module must therefore not import mlx.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from lmx.runtime import settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlasStatus:
    """What :func:`ensure_openblas` did.

    Attributes:
        name: ``"openblas"`` when OpenBLAS was loaded globally, else ``"bundled"``.
        path: the loaded library, when there is one.
        reason: why OpenBLAS is not in use, when it is not.
        core: the CPU kernel set OpenBLAS was built for (e.g. ``ZEN``, ``HASWELL``).
        threads: the threads OpenBLAS was set to (``LMX_BLAS_THREADS``), when it is loaded.
    """

    name: str
    path: str | None = None
    reason: str | None = None
    core: str | None = None
    threads: int | None = None


def _candidate_paths() -> list[Path]:
    env = settings.LMX_OPENBLAS.get()
    found: list[Path] = [env] if env else []
    roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *sys.path}
    for root in roots:
        lib = Path(root) / "cmeel.prefix" / "lib"
        found += [lib / "libopenblas.so.0", lib / "libopenblas.so"]
    return [p for p in found if p.is_file()]


def ensure_openblas() -> BlasStatus:
    """Load OpenBLAS with ``RTLD_GLOBAL`` if this is Linux and mlx is not imported yet.

    Set ``LMX_BLAS=bundled`` to keep MLX's own BLAS, ``LMX_OPENBLAS=/path/lib.so`` to
    name the library, ``LMX_BLAS_THREADS`` for its threads (default 1; see
    :mod:`lmx.runtime.settings`). A missing OpenBLAS only costs speed, and is reported.

    Returns:
        A :class:`BlasStatus` saying which BLAS MLX will use.

    Raises:
        InvalidOptionError: ``LMX_BLAS`` or ``LMX_OPENBLAS`` holds a value they do not take.
    """
    if not sys.platform.startswith("linux"):
        return BlasStatus("platform", reason=f"{sys.platform} uses MLX's own BLAS")
    if settings.LMX_BLAS.get() == "bundled":
        return BlasStatus("bundled", reason="LMX_BLAS=bundled")
    if "mlx.core" in sys.modules:
        return BlasStatus("bundled", reason="mlx.core was imported before lmx")
    reason = "libopenblas not found (pip install cmeel-openblas)"
    for path in _candidate_paths():
        try:
            # Load privately first: a build for a newer CPU than this one dies of SIGILL on its
            # first call, so look at the kernel it was built for before making it global.
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            reason = f"could not load {path}: {e}"
            continue
        core = _corename(lib)
        if core.upper() in _AVX512_CORES and "avx512f" not in _cpu_flags():
            reason = f"{path} is built for {core} (AVX-512) and this CPU has no AVX-512"
            continue
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        threads = settings.LMX_BLAS_THREADS.get()
        _set_threads(lib, threads)
        logger.debug("loaded OpenBLAS (%s) globally from %s, %d thread(s)", core, path, threads)
        return BlasStatus("openblas", path=str(path), core=core, threads=threads)
    return BlasStatus("bundled", reason=reason)


_AVX512_CORES = {"SKYLAKEX", "COOPERLAKE", "SAPPHIRERAPIDS", "ZEN4", "ZEN5"}


def _set_threads(lib: ctypes.CDLL, threads: int) -> None:
    # OpenBLAS's default (one thread per CPU) spin-waits its threads against each other: on a busy
    # machine a 16-token prompt then waited seconds for its first token (RESULTS.md, "CPU thread policy").
    try:
        fn = lib.openblas_set_num_threads
    except AttributeError:
        return
    fn.argtypes = [ctypes.c_int]
    fn(threads)


def _corename(lib: ctypes.CDLL) -> str:
    try:
        fn = lib.openblas_get_corename
    except AttributeError:
        return "unknown"
    fn.restype = ctypes.c_char_p
    return (fn() or b"unknown").decode()


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def mapped_blas_libraries() -> list[str]:
    """Return the BLAS shared libraries mapped into this process (Linux only)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    libs = {line.split()[-1] for line in maps.splitlines() if "blas" in line.lower() and "/" in line}
    return sorted(libs)

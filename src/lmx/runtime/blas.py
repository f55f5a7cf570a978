"""Route MLX's CPU BLAS calls to OpenBLAS on Linux.

The Linux ``mlx[cpu]`` wheel links a reference (netlib) BLAS that runs an fp32 matmul at
about 2 GFLOP/s. Loading OpenBLAS with global symbol visibility *before* ``mlx.core`` is
first imported makes the dynamic linker resolve MLX's ``cblas_*`` symbols to OpenBLAS
(about 100x faster here). This module must therefore not import mlx.
"""

from __future__ import annotations

import ctypes
import importlib.util
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
        kernels_path: the OpenBLAS lmx's CPU kernels multiply prompt blocks with
            (``scipy-openblas32``, whose kernel set is picked for this CPU when it loads, and
            whose symbols carry a prefix: it does not replace MLX's), when it is loaded; else
            the kernels use the one MLX uses.
        kernels_core: the kernel set that one picked (e.g. ``SkylakeX``, ``Haswell``).
    """

    name: str
    path: str | None = None
    reason: str | None = None
    core: str | None = None
    threads: int | None = None
    kernels_path: str | None = None
    kernels_core: str | None = None


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

    Also loads ``scipy-openblas32``, where it is installed, for the CPU kernels' prompt
    products (:func:`_load_kernels_blas`). Set ``LMX_BLAS=bundled`` to keep MLX's own BLAS
    (and neither OpenBLAS), ``LMX_OPENBLAS=/path/lib.so`` to name the library,
    ``LMX_BLAS_THREADS`` for the threads of both (default 1; see :mod:`lmx.runtime.settings`).
    A missing OpenBLAS only costs speed, and is reported.

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
    threads = settings.LMX_BLAS_THREADS.get()
    kernels_path, kernels_core = _load_kernels_blas(threads)
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
        _set_threads(lib, threads)
        logger.debug("loaded OpenBLAS (%s) globally from %s, %d thread(s)", core, path, threads)
        return BlasStatus("openblas", str(path), None, core, threads, kernels_path, kernels_core)
    return BlasStatus("bundled", None, reason, None, None, kernels_path, kernels_core)


def _load_kernels_blas(threads: int) -> tuple[str | None, str | None]:
    """Load scipy-openblas32 for the CPU kernels' sgemm (lmx/kernels/csrc/blas.h).

    cmeel-openblas, which MLX's products bind to, is built for one kernel set (ZEN: AVX2);
    this one picks AVX-512 kernels where the CPU has them: a Gemma 3 270M prompt's float32
    products ran 1.3-1.5x faster on an AVX-512 Xeon (benchmarks/RESULTS.md, round 8).
    Returns its (path, kernel set), or (None, None) where it is not installed.
    """
    spec = importlib.util.find_spec("scipy_openblas32")
    if spec is None or not spec.submodule_search_locations:
        return None, None
    for path in sorted((Path(spec.submodule_search_locations[0]) / "lib").glob("libscipy_openblas*.so")):
        try:
            # RTLD_LOCAL: besides its scipy_-prefixed API it exports 66 LAPACK helpers under their plain
            # names (claqz0_, ...), which must not stand in for cmeel's; the kernels find it by soname.
            lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_LOCAL)
        except OSError as e:
            logger.debug("could not load %s: %s", path, e)
            continue
        _set_threads(lib, threads, prefix="scipy_")
        core = _corename(lib, prefix="scipy_")
        logger.debug("loaded scipy-openblas32 (%s) for the CPU kernels from %s", core, path)
        return str(path), core
    return None, None


_AVX512_CORES = {"SKYLAKEX", "COOPERLAKE", "SAPPHIRERAPIDS", "ZEN4", "ZEN5"}


def _set_threads(lib: ctypes.CDLL, threads: int, prefix: str = "") -> None:
    # OpenBLAS's default (one thread per CPU) spin-waits its threads against each other: on a busy
    # machine a 16-token prompt then waited seconds for its first token (RESULTS.md, "CPU thread policy").
    try:
        fn = getattr(lib, f"{prefix}openblas_set_num_threads")
    except AttributeError:
        return
    fn.argtypes = [ctypes.c_int]
    fn(threads)


def _corename(lib: ctypes.CDLL, prefix: str = "") -> str:
    try:
        fn = getattr(lib, f"{prefix}openblas_get_corename")
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

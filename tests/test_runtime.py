"""runtime/: OpenBLAS really routes MLX's BLAS; device choice; memory limits; error types."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

import lmx  # isort: skip

from lmx import errors
from lmx.runtime import memory
from lmx.runtime.device import choose_device

PROBE = r"""
import ctypes, json
import lmx
import mlx.core as mx
from lmx.runtime import BLAS
from lmx.runtime.blas import mapped_blas_libraries
a = mx.ones((256, 256)); mx.eval(a @ a)

class DlInfo(ctypes.Structure):
    _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p),
                ("sname", ctypes.c_char_p), ("saddr", ctypes.c_void_p)]

def library_of(symbol):  # the file the process-global definition of a symbol comes from, or None
    try:
        addr = ctypes.cast(getattr(ctypes.CDLL(None), symbol), ctypes.c_void_p)
    except AttributeError:
        return None
    info = DlInfo()
    ctypes.CDLL("libc.so.6").dladdr(addr, ctypes.byref(info))
    return info.fname.decode()

source = library_of("cblas_sgemm")  # the one MLX binds to
threads = None
try:  # what OpenBLAS itself says it runs on (LMX_BLAS_THREADS)
    threads = ctypes.CDLL(None).openblas_get_num_threads()
except AttributeError:
    pass
kernels_threads = None
if BLAS.kernels_path:  # what the kernels' OpenBLAS says it runs on
    kernels_threads = ctypes.CDLL(BLAS.kernels_path).scipy_openblas_get_num_threads()
# a LAPACK helper both OpenBLAS builds export under its plain name: cmeel's must stay the global one
helper_from = library_of("claqz0_")
from lmx.kernels import load_module
K, _ = load_module()
print(json.dumps({"blas": BLAS.name, "path": BLAS.path, "mapped": mapped_blas_libraries(), "sgemm_from": source,
                  "threads": threads, "status_threads": BLAS.threads, "kernels_path": BLAS.kernels_path,
                  "kernels_core": BLAS.kernels_core, "kernels_threads": kernels_threads,
                  "kernels_sgemm": K.sgemm_name() if K else None, "helper_from": helper_from,
                  "global_scipy": hasattr(ctypes.CDLL(None), "scipy_cblas_sgemm")}))
"""


def _probe(**env: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env={**os.environ, **env}, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the BLAS fix is Linux-only")
def test_mlx_matmul_resolves_to_openblas():
    result = _probe()
    assert result["blas"] == "openblas"
    assert result["path"] in result["mapped"]
    # The global symbol MLX binds to is OpenBLAS's, not the bundled reference BLAS's.
    assert "openblas" in result["sgemm_from"], result


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the BLAS fix is Linux-only")
def test_openblas_runs_one_thread_unless_told():
    """One spin-waiting OpenBLAS thread per CPU stalled prompts on a busy machine (RESULTS.md)."""
    assert _probe(OPENBLAS_NUM_THREADS="2")["threads"] == 1  # lmx's default wins over OpenBLAS's own
    told = _probe(LMX_BLAS_THREADS="2")
    assert told["threads"] == 2 and told["status_threads"] == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the BLAS fix is Linux-only")
def test_bundled_blas_when_asked():
    result = _probe(LMX_BLAS="bundled")
    assert result["blas"] == "bundled"
    # numpy's own OpenBLAS may be mapped (its symbols are prefixed); cmeel's must not be
    assert not any("cmeel.prefix" in path for path in result["mapped"])
    assert result["sgemm_from"] is None


needs_kernels_blas = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.machine() == "x86_64"),
    reason="scipy-openblas32 is installed (pyproject: cpu extra) where the CPU kernels are built: Linux x86_64",
)


@needs_kernels_blas
def test_cpu_kernels_multiply_prompts_with_an_openblas_picked_for_this_cpu():
    """cmeel's OpenBLAS is built for ZEN (AVX2) only; the kernels' prompt products go through
    scipy-openblas32, which picks its kernel set when it loads, one thread unless told."""
    result = _probe(OPENBLAS_NUM_THREADS="2")
    assert result["kernels_path"] in result["mapped"] and "scipy_openblas32" in result["kernels_path"]
    assert result["kernels_sgemm"] == "scipy_cblas_sgemm", result
    assert result["kernels_threads"] == 1 and result["threads"] == 1
    assert result["kernels_core"] and result["kernels_core"] != "unknown"
    assert "openblas" in result["sgemm_from"] and "scipy" not in result["sgemm_from"]  # MLX keeps cmeel's
    assert not result["global_scipy"]  # loaded locally: none of its names in the global scope
    assert result["helper_from"] is None or "scipy" not in result["helper_from"]
    assert _probe(LMX_BLAS_THREADS="2")["kernels_threads"] == 2


@needs_kernels_blas
def test_bundled_blas_keeps_the_kernels_openblas_out_too():
    result = _probe(LMX_BLAS="bundled")
    assert result["kernels_path"] is None and result["kernels_threads"] is None
    assert not any("scipy_openblas32" in path for path in result["mapped"])
    assert result["kernels_sgemm"] != "scipy_cblas_sgemm"  # the BLAS MLX links, as before


def test_device_choice(monkeypatch):
    monkeypatch.setenv("LMX_DEVICE", "cpu")
    assert choose_device().type == lmx.runtime.device.mx.cpu
    with pytest.raises(errors.InvalidOptionError, match="device must be one of cpu, gpu, got 'tpu'"):
        choose_device("tpu")
    if not lmx.runtime.device.gpu_available():
        with pytest.raises(errors.InvalidOptionError, match="no GPU backend"):
            choose_device("gpu")


def test_memory_limit_and_typed_out_of_memory():
    with pytest.raises(errors.InvalidOptionError, match="positive number of bytes"):
        memory.set_limit(-5)
    limit = memory.active() + 2**30  # models other tests hold in this process stay alive meanwhile
    previous = memory.set_limit(limit)
    try:
        assert memory.stats().limit == limit
        with pytest.raises(errors.OutOfMemoryError, match="KV cache needs"):
            memory.check_allocation(2**31, "KV cache")
        memory.check_allocation(1024, "a little")
    finally:
        memory.set_limit(previous)


def test_error_hierarchy():
    for cls in (errors.InvalidOptionError, errors.ContextLengthError, errors.ConfigError):
        assert issubclass(cls, errors.LmxError) and issubclass(cls, ValueError)
    for cls in (errors.ModelNotFoundError, errors.WeightsError, errors.TokenizerError, errors.OutOfMemoryError):
        assert issubclass(cls, errors.LmxError)

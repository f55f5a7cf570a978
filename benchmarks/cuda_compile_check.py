"""Compile lmx's CUDA kernels with nvcc, as MLX's ``mx.fast.cuda_kernel`` would wrap them (no GPU needed).

MLX builds a custom kernel's source at its first call on a GPU: its own header, the kernel's header,
a ``__global__`` function whose parameters are the inputs (with ``<name>_shape`` / ``<name>_strides``
where the source reads them) and outputs, the template arguments as ``constexpr`` values, then the
source (``mlx/backend/cuda/custom_kernel.cpp``, ``build_kernel``). This script writes the same for
each kernel and template set below, with stand-ins for MLX's ``Shape``/``Strides``, and compiles it
with ``nvcc -arch=sm_90`` (``--ptxas-options=-v``), so a source that does not compile, or a kernel
whose registers times its block's threads pass an SM's 65,536, shows here before a device call.

    python benchmarks/cuda_compile_check.py [--nvcc /usr/local/cuda/bin/nvcc] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import lmx.runtime  # noqa: F401  # isort: skip  (first: BLAS set-up before mlx.core)
import mlx.core as mx

from lmx.kernels import cuda_attention

STANDINS = """
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
namespace mlx::core::cu {
struct Shape { int32_t d[8]; __device__ int32_t operator[](int i) const { return d[i]; } };
struct Strides { int64_t d[8]; __device__ int64_t operator[](int i) const { return d[i]; } };
}
using mlx::core::cu::Shape;
using mlx::core::cu::Strides;
"""

CUDA_TYPE = {mx.bfloat16: "__nv_bfloat16", mx.float16: "__half", mx.float32: "float"}


def wrap(
    name: str,
    header: str,
    source: str,
    inputs: list[tuple[str, str, bool]],
    outputs: list[tuple[str, str]],
    template: list[tuple[str, object]],
) -> str:
    """MLX's build_kernel: inputs (name, CUDA type, whether the source reads its shape/strides)."""
    params = []
    for arg, ctype, shaped in inputs:
        params.append(f"    const {ctype}* {arg}")
        if shaped and f"{arg}_shape" in source:
            params.append(f"    const __grid_constant__ Shape {arg}_shape")
        if shaped and f"{arg}_strides" in source:
            params.append(f"    const __grid_constant__ Strides {arg}_strides")
    params += [f"    {ctype}* {arg}" for arg, ctype in outputs]
    consts = []
    for key, value in template:
        if isinstance(value, bool):
            consts.append(f"  constexpr bool {key} = {'true' if value else 'false'};")
        elif isinstance(value, int):
            consts.append(f"  constexpr int {key} = {value};")
        else:
            consts.append(f"  using {key} = {CUDA_TYPE[value]};")
    return (
        STANDINS
        + header
        + "namespace mlx::core::cu {\n"
        + f"__global__ void {name}(\n"
        + ",\n".join(params)
        + ") {\n"
        + "\n".join(consts)
        + "\n"
        + source
        + "\n}\n}\n"
    )


def attention_cases() -> list[dict]:
    cases = []
    for which, split in (("all", False), ("span", False), ("all", True)):
        base, extra, _, _ = cuda_attention._RANGES[which]
        for dtype in (mx.bfloat16, mx.float16, mx.float32):
            for d in (64, 128, 256, 512, 1024):
                for tiled_pick in (True, False):
                    tiled, warps, kt = cuda_attention.layout(d, dtype.size, tiled_pick)
                    source = cuda_attention.kernel_source(which, split, tiled)
                    ctype = CUDA_TYPE[dtype]
                    inputs = [("q", ctype, True), ("k", ctype, True), ("v", ctype, True)]
                    if extra:
                        inputs.append((extra, "int32_t", False))
                    template = [
                        ("T", dtype),
                        ("D", d),
                        ("WARPS", warps),
                        ("SCALE_BITS", 1031798784),
                        ("TILED", tiled),
                        ("KT", kt),
                    ]
                    outputs = [("part_acc", "float"), ("part_stats", "float")] if split else [("out", ctype)]
                    cases.append(
                        {
                            "kernel": f"{base}_{which}" + ("_split" if split else ""),
                            "dtype": str(dtype),
                            "d": d,
                            "tiled": tiled,
                            "warps": warps,
                            "kt": kt,
                            "threads": warps * 32,
                            "text": wrap(base, cuda_attention._HEADER, source, inputs, outputs, template),
                        }
                    )
    for dtype in (mx.bfloat16, mx.float16, mx.float32):  # the split kernel's combining one
        for d in (64, 128, 256, 512, 1024):
            inputs = [("part_acc", "float", True), ("part_stats", "float", True)]
            text = wrap(
                "lmx_decode_attention_combine",
                cuda_attention.FLOAT_HEADER,
                cuda_attention._COMBINE,
                inputs,
                [("out", CUDA_TYPE[dtype])],
                [("T", dtype), ("D", d)],
            )
            cases.append(
                {
                    "kernel": "lmx_decode_attention_combine",
                    "dtype": str(dtype),
                    "d": d,
                    "tiled": False,
                    "warps": min(d, 256) // 32,
                    "kt": 0,
                    "threads": min(d, 256),
                    "text": text,
                }
            )
    return cases


def compile_one(nvcc: str, text: str, work: Path) -> tuple[bool, int | None, str]:
    src = work / "k.cu"
    src.write_text(text)
    run = subprocess.run(
        [nvcc, "-arch=sm_90", "-std=c++17", "--ptxas-options=-v", "-c", str(src), "-o", str(work / "k.o")],
        capture_output=True,
        text=True,
    )
    found = re.search(r"Used (\d+) registers", run.stderr)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill", run.stderr)]
    return run.returncode == 0 and not any(spills), int(found.group(1)) if found else None, run.stderr[-2000:]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nvcc", default="nvcc")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    ok = True
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in attention_cases():
            built, regs, log = compile_one(args.nvcc, case.pop("text"), Path(tmp))
            fits = built and regs is not None and regs * case["threads"] <= 65536
            ok &= fits
            rows.append({**case, "compiled": built, "registers": regs, "fits": fits})
            print(
                f"{case['kernel']:40} {case['dtype']:14} D={case['d']:4} tiled={case['tiled']!s:5} "
                f"warps={case['warps']:2} kt={case['kt']} regs={regs} {'ok' if fits else 'FAIL'}",
                flush=True,
            )
            if not built:
                print(log)
    if args.json:
        Path(args.json).write_text(json.dumps({"ok": ok, "cases": rows}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

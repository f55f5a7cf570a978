"""``lmx info``: versions, device, BLAS in use, memory, the ``LMX_*`` settings in force; with --model, the
model and its device profile too."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import Any

from lmx.cli.common import add_parallel_args, launch_tensor_parallel, parallel_size


def register(sub: argparse._SubParsersAction) -> None:
    from lmx.cli.common import add_kv_args

    p = sub.add_parser("info", help="show versions, device, BLAS and memory (and a model's details)")
    p.add_argument("--model", "-m", default=None, help="also load and describe this model")
    p.add_argument("--device", choices=["cpu", "gpu"], default=None)
    p.add_argument("--json", action="store_true", help="print JSON")
    add_parallel_args(p)
    add_kv_args(p)
    p.set_defaults(func=run)


def collect(
    model: str | None = None,
    device: str | None = None,
    tensor_parallel: int | None = None,
    distributed_backend: str = "any",
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    pipeline_parallel: int | None = None,
) -> dict[str, Any]:
    import mlx.core as mx

    import lmx
    from lmx.kernels import status as kernel_status
    from lmx.runtime import BLAS, memory, settings
    from lmx.runtime.blas import mapped_blas_libraries
    from lmx.runtime.device import backend_name, choose_device, gpu_available

    choose_device(device)
    stats = memory.stats()
    blas = {"in_use": BLAS.name, "path": BLAS.path, "core": BLAS.core, "threads": BLAS.threads, "reason": BLAS.reason}
    blas |= {"kernels_path": BLAS.kernels_path, "kernels_core": BLAS.kernels_core}
    if sys.platform.startswith("linux"):
        blas["mapped"] = mapped_blas_libraries()
    out: dict[str, Any] = {
        "lmx": lmx.__version__,
        "mlx": mx.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": backend_name(),
        "gpu_available": gpu_available(),
        "blas": blas,
        "cpu_kernels": _kernels(backend_name(), kernel_status()),
        "memory": {"active": stats.active, "peak": stats.peak, "cache": stats.cache, "limit": stats.limit},
        "settings": settings.values(),
    }
    if model is None:
        from lmx.loading.default_model import describe_default_model

        out["default_model"] = describe_default_model()
    else:
        split: dict[str, Any] = {"distributed_backend": distributed_backend}
        if tensor_parallel:
            split["tensor_parallel"] = tensor_parallel
        if pipeline_parallel:
            split["pipeline_parallel"] = pipeline_parallel
        kv = {"kv_bits": kv_bits, "kv_group_size": kv_group_size}
        with lmx.load(model, device=device, **kv, **(split if len(split) > 1 else {})) as engine:
            out["model"] = engine.info().as_dict()
            out["cpu_kernels"]["in_use"] = engine.loaded.cpu_kernels
            out["profile"] = engine.loaded.profile.as_dict()
    return out


def _kernels(device: str, status: Any) -> dict[str, Any]:
    """lmx's CPU kernels: whether they can run here (and whether the model given uses them)."""
    if device != "cpu":
        return {"available": False, "reason": f"not used on the {device} backend", "in_use": False}
    return {
        "available": status.available,
        "reason": status.reason,
        "threads": status.threads,
        "simd": status.simd,
        "int8_activations": status.int8_activations,
    }


def run(args: argparse.Namespace) -> int:
    if parallel_size(args) and args.model is None:
        from lmx.errors import InvalidOptionError

        raise InvalidOptionError("--tensor-parallel and --pipeline-parallel need --model (the model to split)")
    code = launch_tensor_parallel(args)
    if code is not None:
        return code
    info = collect(
        args.model,
        args.device,
        args.tensor_parallel,
        args.distributed_backend,
        args.kv_bits,
        args.kv_group_size,
        args.pipeline_parallel,
    )
    group = info.get("model", {}).get("tensor_parallel")
    if group is not None and group["rank"] != 0:
        return 0  # rank 0 describes the whole group
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    blas = info["blas"]
    blas_line = f"{blas['in_use']}" + (f" ({blas['core']}, {blas['path']})" if blas["path"] else f" ({blas['reason']})")
    print(f"lmx {info['lmx']}  mlx {info['mlx']}  python {info['python']}")
    print(f"platform: {info['platform']}")
    print(f"device:   {info['device']} (GPU available: {info['gpu_available']})")
    print(f"BLAS:     {blas_line}")
    k = info["cpu_kernels"]
    if k["available"]:
        used = {
            True: ", in use by this model",
            False: ", not used by this model (not a GGUF of Q4_0/Q5_0/Q8_0/Q4_K/Q6_K)",
        }
        int8 = ", int8 activations (LMX_CPU_INT8)" if k["int8_activations"] else ""
        print(f"CPU kernels: available ({k['simd']}, {k['threads']} threads{int8}){used.get(k.get('in_use'), '')}")
    else:
        print(f"CPU kernels: not in use ({k['reason']}); MLX's float32 path")
    mem = info["memory"]
    print(f"memory:   active {mem['active'] / 2**20:.1f} MiB, limit {mem['limit'] / 2**30:.1f} GiB")
    for name, value in info["settings"].items():
        print(f"setting:  {name}={'' if value is None else value}")
    if "profile" in info:
        p = info["profile"]
        print(
            f"profile:  {p['device']} ({p['backend']}), {p['dtype']}, ops {p['ops_backend']}, "
            f"prefill {p['prefill_mode']} in chunks of {p['prefill_step_size']}, decode {p['decode_mode']}, "
            f"GGUF matrices {p['gguf_on_device']}"
        )
    if "default_model" in info:
        _print_default_model(info["default_model"])
    if "model" in info:
        from lmx.cli.common import chat_template_note
        from lmx.results import ModelInfo

        model = ModelInfo(**info["model"])
        print(f"runs:     {model.runs_as}")
        note = chat_template_note(model)
        if note:
            print(note)
    if group is not None:
        print(
            f"parallel: {group.get('split', 'tensor-parallel').replace('-', ' ')} over {group['size']} ranks ({group['backend']} backend); numbers below are rank 0's"
        )
        for rank, holds in enumerate(group["ranks"]):
            print(f"  rank {rank}: " + "; ".join(f"{part}: {what}" for part, what in holds.items()))
    for key, value in info.get("model", {}).items():
        if key not in ("profile", "tensor_parallel"):  # printed above
            print(f"model.{key}: {value}")
    return 0


def _print_default_model(d: dict[str, Any]) -> None:
    print(f"model:    none given (--model); the bundled default is {d['name']}: {d['description']}")
    print(f"          package {d['package']}" + (f", file {d['path']}" if "path" in d else ""))
    if d.get("assembled"):
        types = ", ".join(f"{t} {n}" for t, n in d["gguf_types"].items())
        print(f"          GGUF {d['gguf_file_type']}, {d['size_bytes'] / 2**20:.0f} MiB, tensors: {types}")
        if not d["own_chat_template"]:
            print("          no chat template of its own: lmx chat applies Gemma 3's, but replies are continuations")
    elif "path" in d:
        print("          not assembled yet: the first use (lmx generate, lmx.load()) writes it")

"""The device profile: every device-dependent choice, made once when a model is loaded.

The loader (:func:`lmx.loader.load_model`) picks a :class:`DeviceProfile` from the device, the
weights and the settings; the model gets the profile's ops (:func:`make_ops`, ``model.set_ops``)
and the step loop its prefill and decode plan (:class:`StepPlan`, kept by ``lmx.generate.step.DecodeState``). Nothing below
asks which device it is on. ``lmx info`` prints the profile.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from lmx.errors import InvalidOptionError
from lmx.runtime.ops import MLX_OPS, CpuKernelOps, CudaOps, Ops

# The prompt chunk of a prefill. On the CPU a chunk's speed is the same at 128 and 512 tokens and
# its transient memory a quarter (GGUF on the kernels: 13 MiB above weights + KV instead of 38-50
# for a 512-token prompt; benchmarks/RESULTS.md change 12). On a GPU a chunk costs the host about
# the same time whatever its length (building and queueing its graph: ~15 ms for Gemma 3 270M on an
# H200), so long prompts want few chunks: an 8k-token prompt prefilled 3.4-4.0x faster in chunks of
# 2048 than of 512, at 0.4-1.3 GiB more peak memory, less than mlx-lm's at its own 2048
# (benchmarks/RESULTS.md, "The GPU's prompt chunk").
PREFILL_STEP = {"cpu": 128, "gpu": 2048}
# "auto" weight dtype: MLX's fastest CPU path is float32 (measured), a GPU's bfloat16.
AUTO_DTYPE = {"cpu": "float32", "gpu": "bfloat16"}
PREFILL_MODES = ("whole", "layerwise")
DECODE_MODES = ("eager", "segmented", "compiled")
OPS_BACKENDS = ("mlx", "cpu-kernels", "cuda-kernels")
# How a GGUF file's quantized matrices are held where lmx's CPU kernels do not run them: "quantized"
# re-expresses the blocks in MLX's affine layout (nn.QuantizedLinear; exact for Q4_0/Q4_1/Q5_0/Q5_1/
# Q8_0/Q4_K/Q5_K), "float" dequantizes them (the old path). "blocks": the CPU kernels run them as they are.
GGUF_ON_DEVICE = ("quantized", "float")


@dataclass(frozen=True)
class StepPlan:
    """How the step loop (``lmx.generate.step``) prefills and decodes: the part of a
    :class:`DeviceProfile` it reads. The defaults are the portable plan (whole-chunk prefill in
    chunks of 128, eager decode), which is also the CPU's.

    Attributes:
        prefill_step_size: prompt tokens per prefill chunk (CPU 128, GPU 2048).
        prefill_mode: ``"whole"`` builds a chunk's graph, then runs it; ``"layerwise"`` queues
            each layer as soon as it is built (GPU: MLX's CUDA backend keeps an op's inputs until
            the batch of work holding it completes, so a whole chunk keeps every layer's
            intermediates alive at once: Gemma 3 270M, 80 MiB above the weights for 512 tokens).
        decode_mode: ``"eager"`` (op by op), ``"segmented"`` (compiled segments between eager
            attention calls: a GPU step is bound by host work per op) or ``"compiled"`` (one graph).
        encode_thread: a thread of its own queues each decode step (``mx.async_eval``) while the
            step loop builds the next (:mod:`lmx.generate.encoder`; where both are host work).
    """

    prefill_step_size: int = PREFILL_STEP["cpu"]
    prefill_mode: str = "whole"
    decode_mode: str = "eager"
    encode_thread: bool = False

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("prefill_mode", self.prefill_mode, PREFILL_MODES),
            ("decode_mode", self.decode_mode, DECODE_MODES),
        ):
            if value not in allowed:
                raise InvalidOptionError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.prefill_step_size < 1:
            raise InvalidOptionError(f"prefill_step_size must be >= 1, got {self.prefill_step_size}")


@dataclass(frozen=True)
class DeviceProfile(StepPlan):
    """How a loaded model runs on its device: the step loop's plan (:class:`StepPlan`) and
    the rest. The defaults are the portable profile (MLX's ops on the CPU, float32).

    Attributes:
        device: ``"cpu"`` or ``"gpu"``.
        backend: ``"cpu"``, ``"cuda"`` or ``"metal"``.
        dtype: the weights' (and activations') float dtype name.
        ops_backend: ``"mlx"``, ``"cpu-kernels"`` (lmx's CPU kernels for norms, RoPE, attention and
            logsumexp) or ``"cuda-kernels"`` (MLX plus lmx's CUDA kernels: one-query attention, a
            decode step's products by 4- and 8-bit weights and by float weights).
        gguf_on_device: a GGUF model's quantized matrices: ``"blocks"`` (on lmx's CPU kernels),
            ``"quantized"`` (MLX affine layers holding the same values) or ``"float"`` (dequantized).
        fused_projections: each layer's query/key/value projections run as one product, its MLP's
            gate/up as another (``CausalLM.fuse_projections``, at load; GPU: fewer ops a step).
    """

    device: str = "cpu"
    backend: str = "cpu"
    dtype: str = "float32"
    ops_backend: str = "mlx"
    gguf_on_device: str = "float"
    fused_projections: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, value, allowed in (
            ("device", self.device, tuple(PREFILL_STEP)),
            ("ops_backend", self.ops_backend, OPS_BACKENDS),
            ("gguf_on_device", self.gguf_on_device, ("blocks", *GGUF_ON_DEVICE)),
        ):
            if value not in allowed:
                raise InvalidOptionError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")

    def replace(self, **changes: Any) -> DeviceProfile:
        """A copy with ``changes`` (checked as the constructor checks them)."""
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """The fields, device first (as ``lmx info --json`` prints them)."""
        order = (
            "device",
            "backend",
            "dtype",
            "ops_backend",
            "prefill_step_size",
            "prefill_mode",
            "decode_mode",
            "encode_thread",
            "gguf_on_device",
            "fused_projections",
        )
        return {name: getattr(self, name) for name in order}

    def __str__(self) -> str:
        return (
            f"{self.device} ({self.backend}), {self.dtype}, ops {self.ops_backend}, prefill {self.prefill_mode} "
            f"in chunks of {self.prefill_step_size}, decode {self.decode_mode}, GGUF matrices {self.gguf_on_device}"
            + (", fused projections" if self.fused_projections else "")
            + (", steps queued on a thread of their own" if self.encode_thread else "")
        )


def choose_profile(
    device: str,
    *,
    backend: str | None = None,
    dtype: str | None = None,
    cpu_kernels: bool = False,
    cuda_attention: bool = False,
    cuda_kernels: bool = False,
    compile: bool = False,
    gguf_on_device: str | None = None,
    fused_projections: bool = False,
    encode_thread: bool | None = None,
) -> DeviceProfile:
    """The profile for a model about to be loaded.

    Args:
        device: ``"cpu"`` or ``"gpu"``.
        backend: ``"cpu"``, ``"cuda"`` or ``"metal"`` (None: ``"cpu"`` on the CPU, else ``"cuda"``).
        dtype: the weights' dtype name (None: float32 on the CPU, bfloat16 on a GPU).
        cpu_kernels: lmx's CPU kernels are in use (the loader decides: CPU, kernels built,
            ``LMX_CPU_KERNELS`` not 0 or ``cpu_kernels=True``).
        cuda_attention: lmx's one-query CUDA attention may run (``LMX_CUDA_ATTENTION`` not 0);
            used on a CUDA GPU only.
        cuda_kernels: lmx's other CUDA kernels may run (a decode step's quantized products,
            ``LMX_CUDA_QUANTIZED``, its float products, ``LMX_CUDA_DENSE``); used on a CUDA GPU only.
        compile: decode with one compiled graph per step instead of the device's default.
        gguf_on_device: ``"quantized"`` or ``"float"`` (see :data:`GGUF_ON_DEVICE`) where the CPU
            kernels do not run; None: float (quantized is opt-in: its accuracy and speed on a GPU are
            not measured yet; on the CPU MLX's float32 product is the fastest path).
        fused_projections: fuse each layer's q/k/v and gate/up products where the weights allow
            (``LMX_FUSED_PROJECTIONS`` not 0); on a GPU only (on the CPU a step is bound by the
            arithmetic, and a GGUF's matrices on lmx's kernels are blocks of different types).
        encode_thread: queue decode steps on a thread of their own (``LMX_ENCODE_THREAD``: a
            step bound by host work, where building a step and queueing it cost more than running it).
            None: on a CUDA GPU, where it was measured to pay (RESULTS.md "Decode steps queued by a
            thread of their own"); off on the CPU (bound by arithmetic) and on Metal (not measured).

    Raises:
        InvalidOptionError: an unknown device or ``gguf_on_device``, or CPU kernels asked for on a GPU.
    """
    if device not in PREFILL_STEP:
        raise InvalidOptionError(f"device must be one of {', '.join(PREFILL_STEP)}, got {device!r}")
    backend = backend or ("cpu" if device == "cpu" else "cuda")
    gpu = device == "gpu"
    if cpu_kernels and gpu:
        raise InvalidOptionError("cpu_kernels needs the CPU device; on a GPU lmx runs MLX's own kernels")
    if cpu_kernels:
        ops = "cpu-kernels"
    elif gpu and backend == "cuda" and (cuda_attention or cuda_kernels):
        ops = "cuda-kernels"
    else:
        ops = "mlx"
    if gguf_on_device is not None and gguf_on_device not in GGUF_ON_DEVICE:
        raise InvalidOptionError(f"gguf_on_device must be one of {', '.join(GGUF_ON_DEVICE)}, got {gguf_on_device!r}")
    if cpu_kernels:
        gguf = "blocks"
    else:
        gguf = gguf_on_device or "float"  # quantized is opt-in until measured on a GPU (RESULTS.md)
    return DeviceProfile(
        device=device,
        backend=backend,
        dtype=dtype or AUTO_DTYPE[device],
        prefill_step_size=PREFILL_STEP[device],
        prefill_mode="layerwise" if gpu else "whole",
        decode_mode="compiled" if compile else "segmented" if gpu else "eager",
        ops_backend=ops,
        gguf_on_device=gguf,
        fused_projections=gpu and fused_projections,
        encode_thread=(gpu and backend == "cuda") if encode_thread is None else encode_thread,
    )


def make_ops(
    profile: DeviceProfile,
    kernels: ModuleType | None = None,
    cuda: ModuleType | None = None,
    cuda_padded: bool = False,
    cuda_quantized: ModuleType | None = None,
    cuda_attention: bool = True,
    cuda_dense: ModuleType | None = None,
) -> Ops:
    """The ops object of ``profile`` (``kernels``: lmx's built CPU kernels module, for ``cpu-kernels``;
    for ``cuda-kernels``: ``cuda``, :mod:`lmx.kernels.cuda_attention`, whose attention kernel runs
    with ``cuda_attention`` and also takes padded rows with ``cuda_padded``; ``cuda_quantized``,
    :mod:`lmx.kernels.cuda_quantized` or None: MLX's quantized products; ``cuda_dense``,
    :mod:`lmx.kernels.cuda_dense` or None: MLX's float products).

    Raises:
        InvalidOptionError: ``cpu-kernels`` without the kernels module, ``cuda-kernels`` without
            :mod:`lmx.kernels.cuda_attention`.
    """
    if profile.ops_backend == "cpu-kernels":
        if kernels is None:
            raise InvalidOptionError("the cpu-kernels ops backend needs lmx's built CPU kernels module")
        return CpuKernelOps(kernels)
    if profile.ops_backend == "cuda-kernels":
        if cuda is None:
            raise InvalidOptionError("the cuda-kernels ops backend needs lmx.kernels.cuda_attention")
        return CudaOps(cuda, padded=cuda_padded, quantized=cuda_quantized, attention=cuda_attention, dense=cuda_dense)
    return MLX_OPS


__all__ = ["DeviceProfile", "StepPlan", "choose_profile", "make_ops"]

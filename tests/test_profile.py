"""The device profile (lmx.runtime.profile): chosen once at load, it alone decides the ops the
layers call and how the step loop prefills and decodes."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import lmx
from lmx import bench
from lmx.errors import InvalidOptionError
from lmx.generate.sampling import KeySequence, make_sampler
from lmx.generate.step import DecodeState, generate_step, prefill
from lmx.kernels import cuda_attention
from lmx.models import build_model
from lmx.runtime.ops import MLX_OPS, CpuKernelOps, CudaOps, MlxOps
from lmx.runtime.profile import DeviceProfile, StepPlan, choose_profile, make_ops


def test_cpu_and_gpu_profiles():
    cpu = choose_profile("cpu")
    assert (cpu.dtype, cpu.prefill_step_size, cpu.prefill_mode, cpu.decode_mode, cpu.ops_backend) == (
        "float32",
        128,
        "whole",
        "eager",
        "mlx",
    )
    assert choose_profile("cpu", cpu_kernels=True).ops_backend == "cpu-kernels"
    assert choose_profile("cpu", cuda_attention=True).ops_backend == "mlx"  # CUDA attention needs a CUDA GPU
    gpu = choose_profile("gpu", backend="cuda", cuda_attention=True)
    assert (gpu.dtype, gpu.prefill_step_size, gpu.prefill_mode, gpu.decode_mode, gpu.ops_backend) == (
        "bfloat16",
        2048,
        "layerwise",
        "segmented",
        "cuda-kernels",
    )
    assert choose_profile("gpu", backend="cuda", cuda_attention=False).ops_backend == "mlx"  # LMX_CUDA_ATTENTION=0
    assert choose_profile("gpu", backend="metal", cuda_attention=True).ops_backend == "mlx"
    assert choose_profile("gpu", compile=True).decode_mode == "compiled"
    assert choose_profile("cpu", dtype="bfloat16").dtype == "bfloat16"


def test_profile_refuses_bad_values():
    with pytest.raises(InvalidOptionError, match="cpu_kernels needs the CPU"):
        choose_profile("gpu", cpu_kernels=True)
    with pytest.raises(InvalidOptionError, match="device must be one of cpu, gpu, got 'tpu'"):
        choose_profile("tpu")
    with pytest.raises(InvalidOptionError, match="decode_mode must be one of eager, segmented, compiled"):
        DeviceProfile(decode_mode="fast")
    with pytest.raises(InvalidOptionError, match="prefill_step_size must be >= 1"):
        StepPlan(prefill_step_size=0)
    with pytest.raises(InvalidOptionError, match="needs lmx's built CPU kernels"):
        make_ops(choose_profile("cpu", cpu_kernels=True))


def test_make_ops():
    assert make_ops(DeviceProfile()) is MLX_OPS
    assert isinstance(make_ops(choose_profile("gpu", cuda_attention=True), cuda=cuda_attention), CudaOps)
    with pytest.raises(InvalidOptionError, match="cuda-kernels ops backend needs"):
        make_ops(choose_profile("gpu", cuda_attention=True))
    assert isinstance(make_ops(choose_profile("cpu", cpu_kernels=True), kernels=object()), CpuKernelOps)  # type: ignore[arg-type]


def test_loaded_model_carries_its_profile(tiny_dirs):
    with lmx.load(tiny_dirs["gemma3"], device="cpu", cpu_kernels=False) as engine:
        profile = engine.loaded.profile
        assert (profile.device, profile.ops_backend, profile.decode_mode) == ("cpu", "mlx", "eager")
        assert engine.loaded.model.ops is MLX_OPS
        assert engine.info().profile == profile.as_dict()
        assert engine.prefill_step_size == profile.prefill_step_size


class CountingOps(MlxOps):
    """MLX's ops, counting the calls of each."""

    name = "counting"

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def rms_norm(self, x, weight, eps):
        self._count("rms_norm")
        return super().rms_norm(x, weight, eps)

    def rope(self, x, dims, offset, **kw):
        self._count("rope")
        return super().rope(x, dims, offset, **kw)

    def attention(self, q, k, v, scale, mask):
        self._count("attention")
        return super().attention(q, k, v, scale, mask)

    def logsumexp(self, x):
        self._count("logsumexp")
        return super().logsumexp(x)


@pytest.mark.parametrize(("config", "norms_per_layer"), [("tiny-gemma3", 6), ("tiny-qwen3", 4)])
def test_set_ops_once_reaches_every_layer(config, norms_per_layer):
    model = build_model(bench.config_for(config))
    bench.random_weights(model, mx.float32, seed=1)
    tokens = mx.array([[1, 2, 3, 4]])
    want = model(tokens)
    ops = CountingOps()
    model.set_ops(ops)
    got = model(tokens)
    n = len(model.layers)
    # per layer: input/post norms (+ Gemma's two feed-forward norms), q and k norms; one final norm
    assert ops.calls == {"rms_norm": n * norms_per_layer + 1, "rope": 2 * n, "attention": n}
    np.testing.assert_array_equal(np.array(got), np.array(want))
    steps = generate_step(model, tokens, model.make_cache(), make_sampler(0.0), KeySequence(0).next)
    next(steps)
    steps.close()
    assert ops.calls["logsumexp"] >= 1  # the step loop's log-softmax goes through the model's ops too


def test_cuda_ops_in_a_model(monkeypatch: pytest.MonkeyPatch):
    """A model given CudaOps (a CUDA GPU's profile) sends each layer's one-query attention to lmx's
    kernel and nothing else; here the kernel is replaced by MLX's attention, which the CPU runs."""
    calls = []

    def fake(q, k, v, scale):
        calls.append(q.shape)
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)

    monkeypatch.setattr(cuda_attention, "decode_attention_fitted", fake)
    cfg = dict(bench.config_for("tiny-gemma3"), head_dim=32, query_pre_attn_scalar=32)  # a head dim MLX does not fuse
    model = build_model(cfg)
    bench.random_weights(model, mx.float32, seed=2)
    prompt = mx.array([[5, 6, 7, 8]])
    eager = generate_step(model, prompt, model.make_cache(), make_sampler(0.0), KeySequence(0).next)
    want = [int(next(eager)[0].item()) for _ in range(3)]
    model.set_ops(CudaOps(cuda_attention))
    steps = generate_step(model, prompt, model.make_cache(), make_sampler(0.0), KeySequence(0).next)
    got = [int(next(steps)[0].item()) for _ in range(3)]
    assert got == want
    n = len(model.layers)
    # the prompt (4 queries, causal) goes to MLX; the decode steps queued so far are one query each
    assert len(calls) >= 2 * n and all(shape[2] == 1 for shape in calls)


@pytest.mark.parametrize("config", ["tiny-gemma3", "tiny-qwen3"])
def test_the_plan_picks_the_decode_step(config):
    """``decode_mode="segmented"`` (a GPU's plan) decodes in segments without being asked per call,
    and gives the eager step's tokens."""
    model = build_model(bench.config_for(config))
    bench.random_weights(model, mx.float32, seed=3)
    prompt = mx.random.randint(0, 512, (1, 20), key=mx.random.key(4))

    def tokens(state: DecodeState) -> list[int]:
        steps = generate_step(model, prompt, model.make_cache(), make_sampler(0.0), KeySequence(0).next, state=state)
        out = [int(next(steps)[0].item()) for _ in range(12)]
        steps.close()
        return out

    eager_state, segmented_state = DecodeState(model), DecodeState(model, StepPlan(decode_mode="segmented"))
    eager = tokens(eager_state)
    assert not eager_state.segments_made
    assert tokens(segmented_state) == eager
    assert segmented_state.segments_made
    compiled_state = DecodeState(model, StepPlan(decode_mode="compiled"))
    assert tokens(compiled_state) == eager
    assert not compiled_state.segments_made


def test_the_plan_picks_the_prefill(monkeypatch: pytest.MonkeyPatch):
    """A plan's chunk size and layer-wise prefill reach the step loop (counted: attention calls per
    chunk, layers queued one by one); the logits are those of one whole chunk."""
    model = build_model(bench.config_for("tiny-gemma3"))
    bench.random_weights(model, mx.float32, seed=5)
    n = len(model.layers)
    prompt = mx.random.randint(0, 512, (1, 40), key=mx.random.key(6))
    whole = prefill(model, prompt, model.make_cache(), step_size=64)
    expected = np.array(whole - mx.logsumexp(whole, axis=-1, keepdims=True))
    queued = []
    async_eval = mx.async_eval
    monkeypatch.setattr(mx, "async_eval", lambda *a: queued.append(len(a)) or async_eval(*a))
    for plan, chunks, layerwise in (
        (StepPlan(prefill_step_size=16, prefill_mode="layerwise"), 3, True),
        (StepPlan(prefill_step_size=7), 6, False),
    ):
        ops, queued[:] = CountingOps(), []
        model.set_ops(ops)
        steps = generate_step(
            model, prompt, model.make_cache(), make_sampler(0.0), KeySequence(0).next, state=DecodeState(model, plan)
        )
        _, logprobs = next(steps)  # the prefill, and the first decode step queued
        steps.close()
        assert ops.calls["attention"] == (chunks + 1) * n
        assert len(queued) == (chunks * n if layerwise else 0) + 2  # + the two sampled steps
        np.testing.assert_allclose(np.array(logprobs), expected, rtol=0, atol=1e-4)

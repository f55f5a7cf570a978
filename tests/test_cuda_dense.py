"""The float products' seam (``Ops.dense_product``, :func:`lmx.models.base.product`) and the CUDA
float product kernel's dispatch (:mod:`lmx.kernels.cuda_dense`, ``LMX_CUDA_DENSE``).

This machine cannot run CUDA: the kernel's values are checked on a GPU by
``benchmarks/cuda_dense_check.py``. Here a stand-in for the kernel module computes MLX's product
and records its calls, so the tests see which products a decode step sends to the kernel (every
float one, in a decode step only, the compiled segments' included) and that what comes back is
what the layers return.
"""

from __future__ import annotations

import types

import mlx.core as mx
import mlx.nn as nn
import pytest

from lmx import bench
from lmx.generate.sampling import KeySequence, make_sampler
from lmx.generate.step import DecodeState, generate_step
from lmx.kernels import cuda_attention, cuda_dense
from lmx.models import build_model
from lmx.models.base import Linear, product
from lmx.runtime.ops import MLX_OPS, CudaOps
from lmx.runtime.profile import StepPlan, choose_profile, make_ops


def float_model(config: str) -> nn.Module:
    model = build_model(bench.config_for(config))
    bench.random_weights(model, mx.float32, seed=5)
    mx.eval(model.parameters())
    return model


def recording_kernel(calls: list[tuple[int, ...]], offset: float = 0.0) -> types.SimpleNamespace:
    """A stand-in for :mod:`lmx.kernels.cuda_dense`: MLX's product (plus ``offset``), recorded."""

    def decode_product(x, w):
        calls.append(tuple(w.shape))
        return x @ w.T + offset

    return types.SimpleNamespace(supported=cuda_dense.supported, decode_product=decode_product)


def greedy(model: nn.Module, n: int = 4, segments: bool = False) -> list[int]:
    prompt = mx.array([[3, 9, 27, 81, 243]])
    state = DecodeState(model, StepPlan(decode_mode="segmented" if segments else "eager"))
    steps = generate_step(
        model, prompt, model.make_cache(), make_sampler(0.0), KeySequence(0).next, segments=segments, state=state
    )
    out = [int(next(steps)[0].item()) for _ in range(n)]
    steps.close()
    return out


def test_mlx_ops_product_is_the_linear_layer_s_own():
    layer = Linear(64, 24, bias=False)
    x = mx.random.normal((3, 64), key=mx.random.key(2))
    assert mx.array_equal(product(MLX_OPS, layer, x), layer(x))
    assert mx.array_equal(MLX_OPS.dense_product(x, layer.weight), layer(x))  # without a kept transpose


@pytest.mark.parametrize("segments", [False, True])
@pytest.mark.parametrize("config", ["tiny-qwen3", "tiny-gemma3"])
def test_a_decode_step_sends_every_float_product_to_the_kernel(config, segments):
    """Fused q/k/v and gate/up, o, down and the head (Gemma's tied embedding) all go to the kernel in a
    decode step, eager or in compiled segments; the prompt's products do not."""
    model = float_model(config)
    want = greedy(model)
    model.fuse_projections()
    calls: list[tuple[int, ...]] = []
    model.set_ops(CudaOps(cuda_attention, dense=recording_kernel(calls), attention=False))
    assert greedy(model, segments=segments) == want  # the kernel's output is what the layers return
    n = len(model.layers)
    args = model.args
    head = [c for c in calls if c[0] == args.vocab_size]
    layers = [c for c in calls if c[0] != args.vocab_size]
    if segments:  # traced once: each product is recorded when a segment is traced, not per step
        assert len(head) == 1 and len(layers) == 4 * n
    else:  # 3 decode steps ran (the 4th token is queued)
        assert len(head) >= 3 and len(layers) == 4 * n * len(head)
    steps = len(head)
    qkv = (args.num_attention_heads + 2 * args.num_key_value_heads) * args.head_dim
    assert sum(c == (qkv, args.hidden_size) for c in layers) == n * steps  # q/k/v as one fused product
    assert sum(c == (2 * args.intermediate_size, args.hidden_size) for c in layers) == n * steps  # gate/up
    assert head == [(args.vocab_size, args.hidden_size)] * steps


def test_the_kernel_s_output_is_what_the_model_uses():
    """A kernel that returns something else changes the logits: its output is not discarded."""
    model = float_model("tiny-qwen3")
    plain = model(mx.array([[1]]))
    calls: list[tuple[int, ...]] = []
    model.set_ops(CudaOps(cuda_attention, dense=recording_kernel(calls, offset=0.5), attention=False))
    with model.ops.inference():
        off = model(mx.array([[1]]))
    assert calls and not mx.allclose(off, plain)


def test_no_kernel_outside_a_decode_step():
    """The kernel has no gradient: outside ``inference()`` (a prompt, training) MLX's product runs, and a
    gradient through the model works."""
    model = float_model("tiny-gemma3")
    calls: list[tuple[int, ...]] = []
    model.set_ops(CudaOps(cuda_attention, dense=recording_kernel(calls), attention=False))
    h = model.embed(mx.array([[4]]))

    def loss(emb: mx.array) -> mx.array:
        return model.head(model.model.norm(emb)).sum()

    grad = mx.grad(loss)(h)
    mx.eval(grad)
    assert calls == [] and grad.shape == h.shape and bool(mx.isfinite(grad).all())
    with model.ops.inference():
        mx.eval(loss(h))
    assert calls == [(model.args.vocab_size, model.args.hidden_size)]  # the tied head, in a decode step


def test_a_wrapped_or_biased_layer_runs_itself():
    """A layer with a bias, or a subclass (an adapter's wrapper runs itself), is not the kernel's."""
    calls: list[tuple[int, ...]] = []
    ops = CudaOps(cuda_attention, dense=recording_kernel(calls), attention=False)
    biased = Linear(64, 24, bias=True)
    x = mx.ones((1, 64))
    with ops.inference():
        assert mx.array_equal(product(ops, biased, x), biased(x))
    assert calls == []


def test_supported_takes_decode_rows_of_one_float_dtype():
    w = mx.zeros((40, 256), dtype=mx.bfloat16)
    x = mx.zeros((1, 1, 256), dtype=mx.bfloat16)
    assert cuda_dense.supported(x, w)
    assert cuda_dense.supported(mx.zeros((8, 256), mx.bfloat16), w)
    assert not cuda_dense.supported(mx.zeros((9, 256), mx.bfloat16), w)  # a prompt's rows
    assert not cuda_dense.supported(x.astype(mx.float32), w)  # dtypes differ
    assert not cuda_dense.supported(mx.zeros((1, 252), mx.bfloat16), mx.zeros((40, 252), mx.bfloat16))  # K % 8
    assert not cuda_dense.supported(mx.zeros((1, 256), mx.int32), mx.zeros((40, 256), mx.int32))
    assert not cuda_dense.supported(x, w.T)  # (K, N): not a Linear's layout
    with pytest.raises(ValueError, match=r"got x \(9, 256\) mlx.core.bfloat16, w \(40, 256\)"):
        cuda_dense.decode_product(mx.zeros((9, 256), mx.bfloat16), w)


def test_the_kernel_is_opt_in():
    """Off by default (not measured end to end yet): the GPU profile's ops then run MLX's products."""
    assert make_ops(choose_profile("gpu", cuda_attention=True), cuda=cuda_attention).dense is None
    ops = make_ops(choose_profile("gpu", cuda_attention=True), cuda=cuda_attention, cuda_dense=cuda_dense)
    assert isinstance(ops, CudaOps) and ops.dense is cuda_dense


def test_the_loader_maps_the_setting_on_a_cuda_gpu(monkeypatch):
    """``LMX_CUDA_DENSE=1`` gives the CUDA profile's ops the kernel, even with the attention kernel off
    (a CUDA GPU named here: this machine has none; nothing runs on it)."""
    from lmx.loading import loader

    monkeypatch.setattr(loader, "device_name", lambda: "gpu")
    monkeypatch.setattr(loader, "backend_name", lambda: "cuda")
    monkeypatch.setenv("LMX_CUDA_ATTENTION", "0")
    for value, expected in (("0", None), ("1", cuda_dense)):
        monkeypatch.setenv("LMX_CUDA_DENSE", value)
        profile = loader.load_profile("auto")
        ops = loader.profile_ops(profile)
        assert getattr(ops, "dense", None) is expected, value

"""The quantized products' seam (``Ops.quantized_matmul``, :func:`lmx.models.base.product`) and the
CUDA product kernel's dispatch (:mod:`lmx.kernels.cuda_quantized`, ``LMX_CUDA_QUANTIZED``, on by default).

This machine cannot run CUDA: the kernel's values are checked on a GPU by
``benchmarks/cuda_quantized_check.py``. Here a stand-in for the kernel module computes MLX's product
and records its calls, so the tests see which products a decode step sends to the kernel (every
MLX-quantized one, in a decode step only) and that what comes back is used as the layers' output.
"""

from __future__ import annotations

import types

import mlx.core as mx
import mlx.nn as nn
import pytest

from lmx import bench
from lmx.generate.sampling import KeySequence, make_sampler
from lmx.generate.step import generate_step
from lmx.kernels import cuda_attention, cuda_quantized
from lmx.models import build_model
from lmx.models.base import product
from lmx.runtime.ops import MLX_OPS, CudaOps
from lmx.runtime.profile import choose_profile, make_ops


def quantized_model(config: str) -> nn.Module:
    model = build_model(bench.config_for(config))
    bench.random_weights(model, mx.float32, seed=5)
    nn.quantize(model, group_size=64, bits=4)
    mx.eval(model.parameters())
    return model


def recording_kernel(calls: list[tuple[int, ...]], offset: float = 0.0) -> types.SimpleNamespace:
    """A stand-in for :mod:`lmx.kernels.cuda_quantized`: MLX's product (plus ``offset``), recorded."""

    def decode_product(x, w, scales, biases, group_size, bits):
        calls.append(tuple(w.shape))
        y = mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits)
        return y + offset

    return types.SimpleNamespace(wanted=cuda_quantized.supported, decode_product=decode_product)


def greedy(model: nn.Module, n: int = 4) -> list[int]:
    prompt = mx.array([[3, 9, 27, 81, 243]])
    steps = generate_step(model, prompt, model.make_cache(), make_sampler(0.0), KeySequence(0).next)
    out = [int(next(steps)[0].item()) for _ in range(n)]
    steps.close()
    return out


def test_mlx_ops_product_is_the_quantized_layer_s_own():
    layer = nn.QuantizedLinear(128, 48, bias=True, group_size=64, bits=4)
    layer.bias = mx.random.normal((48,), key=mx.random.key(1))
    x = mx.random.normal((3, 128), key=mx.random.key(2))
    assert mx.array_equal(product(MLX_OPS, layer, x), layer(x))


@pytest.mark.parametrize("config", ["tiny-qwen3", "tiny-gemma3"])
def test_a_decode_step_sends_every_quantized_product_to_the_kernel(config):
    """Fused q/k/v and gate/up, o, down and the head (Gemma's tied embedding) all go to the kernel in a
    decode step; the prompt's products (more rows than a decode step has) do not."""
    model = quantized_model(config)
    want = greedy(model)
    model.fuse_projections()
    calls: list[tuple[int, ...]] = []
    model.set_ops(CudaOps(cuda_attention, quantized=recording_kernel(calls), attention=False))
    assert greedy(model) == want  # the kernel's output is what the layers return
    n = len(model.layers)
    args = model.args
    vocab = args.vocab_size
    head = [c for c in calls if c[0] == vocab]
    layers = [c for c in calls if c[0] != vocab]
    # 3 decode steps ran (the 4th token is queued); 4 products a layer (q/k/v, o, gate/up, down), one head
    steps = len(head)
    assert steps >= 3
    assert len(layers) == 4 * n * steps
    qkv = (args.num_attention_heads + 2 * args.num_key_value_heads) * args.head_dim
    assert sum(c[0] == qkv for c in layers) == n * steps  # q/k/v as one fused product
    assert sum(c[0] == 2 * args.intermediate_size for c in layers) == n * steps  # gate/up as one


def test_the_kernel_s_output_is_what_the_model_uses():
    """A kernel that returns something else changes the tokens: its output is not discarded."""
    model = quantized_model("tiny-qwen3")
    want = greedy(model, 6)
    calls: list[tuple[int, ...]] = []
    model.set_ops(CudaOps(cuda_attention, quantized=recording_kernel(calls, offset=0.5), attention=False))
    with model.ops.inference():
        off = model(mx.array([[1]]))
    model.set_ops(MLX_OPS)
    plain = model(mx.array([[1]]))
    assert calls and not mx.allclose(off, plain)
    assert greedy(model, 6) == want


def test_no_kernel_outside_a_decode_step():
    """The kernel has no gradient: outside ``inference()`` (a prompt, training) MLX's product runs, and a
    gradient through a quantized model works."""
    model = quantized_model("tiny-qwen3")
    calls: list[tuple[int, ...]] = []
    model.set_ops(CudaOps(cuda_attention, quantized=recording_kernel(calls), attention=False))
    tokens = mx.array([[4]])

    def loss(emb: mx.array) -> mx.array:
        return model.head(model.model.norm(emb)).sum()

    h = model.embed(tokens)
    grad = mx.grad(loss)(h)
    mx.eval(grad)
    assert calls == [] and grad.shape == h.shape and bool(mx.isfinite(grad).all())
    with model.ops.inference():
        mx.eval(loss(h))
    assert calls == [(model.args.vocab_size, model.args.hidden_size * 4 // 32)]  # the head, in a decode step


def test_wanted_takes_large_affine_matrices_of_decode_rows():
    w, s, b = mx.quantize(mx.zeros((64, 256)), group_size=64, bits=4)
    x = mx.zeros((1, 256))
    assert cuda_quantized.supported(x, w, s, b, 64, 4, "affine")
    assert not cuda_quantized.wanted(x, w, s, b, 64, 4, "affine")  # 8 KiB: MLX's product
    assert not cuda_quantized.supported(mx.zeros((9, 256)), w, s, b, 64, 4, "affine")  # a prompt's rows
    assert not cuda_quantized.supported(x.astype(mx.bfloat16), w, s, b, 64, 4, "affine")  # dtypes differ
    assert not cuda_quantized.supported(x, w, s, None, 64, 4, "affine")
    assert not cuda_quantized.supported(x, w, s, b, 64, 4, "mxfp4")
    w3, s3, b3 = mx.quantize(mx.zeros((64, 256)), group_size=64, bits=3)
    assert not cuda_quantized.supported(x, w3, s3, b3, 64, 3, "affine")
    with pytest.raises(ValueError, match=r"got x \(9, 256\)"):
        cuda_quantized.decode_product(mx.zeros((9, 256)), w, s, b, 64, 4)


def test_rows_per_warp():
    assert cuda_quantized.rows_per_warp(151936) == 4
    assert cuda_quantized.rows_per_warp(1536) == 2
    assert cuda_quantized.rows_per_warp(640) == 1


def test_the_profile_takes_the_kernel_only_where_asked():
    """``choose_profile``/``make_ops``: the kernel module is the ops' only where given."""
    assert choose_profile("gpu", backend="cuda", cuda_attention=False).ops_backend == "mlx"
    profile = choose_profile("gpu", backend="cuda", cuda_attention=False, cuda_kernels=True)
    assert profile.ops_backend == "cuda-kernels"
    ops = make_ops(profile, cuda=cuda_attention, cuda_quantized=cuda_quantized, cuda_attention=False)
    assert isinstance(ops, CudaOps) and ops.quantized is cuda_quantized and not ops.attends
    assert make_ops(choose_profile("gpu", cuda_attention=True), cuda=cuda_attention).quantized is None


def test_the_loader_gives_a_cuda_gpu_the_kernel_by_default(monkeypatch):
    """On a CUDA GPU the loaded profile's ops take the kernel unless ``LMX_CUDA_QUANTIZED=0``, with the
    attention kernel on or off (a CUDA GPU named here: this machine has none; nothing runs on it)."""
    from lmx.loading import loader

    monkeypatch.setattr(loader, "device_name", lambda: "gpu")
    monkeypatch.setattr(loader, "backend_name", lambda: "cuda")
    monkeypatch.delenv("LMX_CUDA_QUANTIZED", raising=False)
    for attention in ("0", "1"):
        monkeypatch.setenv("LMX_CUDA_ATTENTION", attention)
        monkeypatch.delenv("LMX_CUDA_QUANTIZED", raising=False)
        assert getattr(loader.profile_ops(loader.load_profile("auto")), "quantized", None) is cuda_quantized
        monkeypatch.setenv("LMX_CUDA_QUANTIZED", "0")
        assert getattr(loader.profile_ops(loader.load_profile("auto")), "quantized", None) is None, attention
    monkeypatch.setattr(loader, "backend_name", lambda: "metal")  # another GPU: MLX's ops, no CUDA kernel
    monkeypatch.delenv("LMX_CUDA_QUANTIZED", raising=False)
    assert getattr(loader.profile_ops(loader.load_profile("auto")), "quantized", None) is None

"""Fused projections (``CausalLM.fuse_projections``, :class:`lmx.models.base.FusedProducts`): each
layer's q/k/v products as one, its MLP's gate/up as another, with the weights held once.

The GPU profile fuses at load; here the fusion is forced on the CPU, where MLX computes the fused
and the separate products alike, so the logits must agree to float rounding and the tokens exactly.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import lmx
from lmx import bench
from lmx.generate.step import DecodeState
from lmx.loading import loader
from lmx.models import build_model
from lmx.models.base import FusedProducts, Linear
from lmx.runtime.profile import choose_profile
from lmx.train.lora import apply_lora, fuse_lora, unload_adapter
from test_segments import decode


def model_of(config: str, quantized: bool = False, seed: int = 1) -> nn.Module:
    model = build_model(bench.config_for(config))
    bench.random_weights(model, mx.float32, seed=seed)
    if quantized:
        nn.quantize(model, group_size=32, bits=4, class_predicate=lambda p, m: isinstance(m, nn.Linear))
    mx.eval(model.parameters())
    return model


def forward(model: nn.Module, tokens: mx.array) -> np.ndarray:
    return np.array(model(tokens, model.make_cache()))


PROMPT = mx.random.randint(0, 384, (2, 24), key=mx.random.key(3))
GROUPS = {"tiny-gemma3": 2, "tiny-qwen3": 2, "tiny-qwen3-moe": 1}  # fused groups a layer (MoE: its experts stay apart)


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("config", list(GROUPS))
def test_fused_model_decodes_what_the_unfused_one_does(config, quantized):
    model = model_of(config, quantized)
    eager = decode(model, PROMPT, 40, False)
    names = sorted(k for k, _ in tree_flatten(model.parameters()))
    mx.clear_cache()
    before = mx.get_active_memory()

    assert model.fuse_projections() == GROUPS[config] * len(model.layers)

    mx.clear_cache()
    assert mx.get_active_memory() <= before  # the weights are held once: views of the fused arrays
    assert sorted(k for k, _ in tree_flatten(model.parameters())) == names  # nothing new to save or train
    state = DecodeState(model)
    for tokens, logprobs in (decode(model, PROMPT, 40, False), decode(model, PROMPT, 40, True, state=state)):
        assert tokens == eager[0]
        np.testing.assert_allclose(logprobs, eager[1], rtol=0, atol=1e-5)
    assert state.segments_made


def test_the_fused_product_runs_and_splits_where_each_part_belongs(monkeypatch):
    model = model_of("tiny-qwen3")
    attn = model.layers[0].self_attn
    x = mx.random.normal((3, attn.q_proj.weight.shape[1]), key=mx.random.key(5))
    alone = [np.array(layer(x)) for layer in (attn.q_proj, attn.k_proj, attn.v_proj)]
    want = [np.array(a) for a in attn.project(x[:, None, :], 0)]  # (B, heads, 1, head_dim), normed and rotated
    assert attn.fuse()
    calls = []
    original = FusedProducts.__call__

    def counted(self, x, ops):
        calls.append(x.shape)
        return original(self, x, ops)

    monkeypatch.setattr(FusedProducts, "__call__", counted)
    got = attn.project(x[:, None, :], 0)
    assert calls == [(3, 1, x.shape[1])]  # one product made all three
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(np.array(g), w, rtol=1e-6, atol=1e-6)
    fused = original(attn.fused, x)
    assert [p.shape for p in fused] == [a.shape for a in alone]
    for g, w in zip(fused, alone):
        np.testing.assert_allclose(np.array(g), w, rtol=1e-6, atol=1e-6)


def test_lora_and_new_weights_after_fusion_run_the_layers_they_name():
    reference, model = model_of("tiny-gemma3"), model_of("tiny-gemma3")
    model.fuse_projections()
    tokens = PROMPT[:1]
    for m in (reference, model):  # the same adapter, with a non-zero update, on both
        apply_lora(m, rank=4, alpha=8.0, seed=7)
        for layer in m.layers:
            for lora in (layer.self_attn.k_proj, layer.mlp.up_proj):
                lora.lora_b = mx.random.normal(lora.lora_b.shape, key=mx.random.key(9)) * 0.1
    np.testing.assert_allclose(forward(model, tokens), forward(reference, tokens), rtol=0, atol=1e-5)

    unload_adapter(model)  # back to the fused layers
    unload_adapter(reference)
    assert model.layers[0].self_attn.fused is not None
    np.testing.assert_allclose(forward(model, tokens), forward(reference, tokens), rtol=0, atol=1e-5)

    new = mx.random.normal(model.layers[1].self_attn.v_proj.weight.shape, key=mx.random.key(11))
    for m in (reference, model):
        m.layers[1].self_attn.v_proj.weight = new
    np.testing.assert_allclose(forward(model, tokens), forward(reference, tokens), rtol=0, atol=1e-5)
    assert model.layers[1].self_attn.fused is None  # dropped: its array is not held twice
    assert model.layers[0].self_attn.fused is not None

    for m in (reference, model):
        apply_lora(m, rank=2, alpha=4.0, seed=8, targets=("gate_proj",))
        for layer in m.layers:
            layer.mlp.gate_proj.lora_b = mx.ones(layer.mlp.gate_proj.lora_b.shape) * 0.05
        fuse_lora(m)
    np.testing.assert_allclose(forward(model, tokens), forward(reference, tokens), rtol=0, atol=1e-5)
    assert all(layer.mlp.fused is None for layer in model.layers)


def test_layers_that_cannot_be_fused_are_left_as_they_are():
    with_bias = [Linear(8, 4, bias=True), Linear(8, 4, bias=False)]
    other_input = [Linear(8, 4, bias=False), Linear(16, 4, bias=False)]
    q4, q8 = nn.QuantizedLinear(64, 8, bias=False, bits=4), nn.QuantizedLinear(64, 8, bias=False, bits=8)
    plain_and_quantized = [Linear(64, 8, bias=False), q4]
    for layers in (with_bias, other_input, [q4, q8], plain_and_quantized):
        weights = [layer.weight for layer in layers]
        assert FusedProducts.of(layers) is None
        assert all(layer.weight is w for layer, w in zip(layers, weights))


def test_the_gpu_profile_fuses_and_the_cpu_profile_does_not():
    assert choose_profile("gpu", fused_projections=True).fused_projections
    assert not choose_profile("gpu").fused_projections  # LMX_FUSED_PROJECTIONS=0
    assert not choose_profile("cpu", fused_projections=True).fused_projections
    assert choose_profile("gpu", fused_projections=True).as_dict()["fused_projections"] is True
    assert "fused projections" in str(choose_profile("gpu", fused_projections=True))


def test_a_model_loaded_with_fusion_generates_what_one_without_does(tiny_dirs, monkeypatch):
    options = dict(max_tokens=12, temperature=0.0, logprobs=0)
    with lmx.load(tiny_dirs["qwen3"], device="cpu", cpu_kernels=False) as engine:
        want = engine.generate("The cat sat on", **options)
        assert not engine.loaded.profile.fused_projections
        assert engine.loaded.model.layers[0].self_attn.fused is None
    chosen = loader.load_profile
    monkeypatch.setattr(loader, "load_profile", lambda *a, **k: chosen(*a, **k).replace(fused_projections=True))
    with lmx.load(tiny_dirs["qwen3"], device="cpu", cpu_kernels=False) as engine:
        assert engine.loaded.profile.fused_projections
        assert engine.loaded.model.layers[0].self_attn.fused is not None
        got = engine.generate("The cat sat on", **options)
    assert got.tokens == want.tokens and len(want.tokens) == len(want.logprobs) == 12
    np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=0, atol=1e-5)


def test_bench_fuses_the_quantized_layers_it_makes(monkeypatch):
    """``lmx bench --quantize`` quantizes after load; where the profile fuses, the quantized layers are
    fused again (not left running alone), and compute what the unfused quantized model computes."""
    chosen = loader.load_profile
    plain = bench.load_bench_model(None, "tiny-gemma3", "float32", None, 4)
    monkeypatch.setattr(loader, "load_profile", lambda *a, **k: chosen(*a, **k).replace(fused_projections=True))
    fused = bench.load_bench_model(None, "tiny-gemma3", "float32", None, 4)
    attn = fused.model.layers[0].self_attn
    assert isinstance(attn.q_proj, nn.QuantizedLinear) and attn.fused is not None
    assert attn.fused.holds((attn.q_proj, attn.k_proj, attn.v_proj))
    assert plain.model.layers[0].self_attn.fused is None
    np.testing.assert_allclose(forward(fused.model, PROMPT), forward(plain.model, PROMPT), rtol=0, atol=1e-5)


@pytest.mark.parametrize("config", ["tiny-gemma3", "tiny-qwen3"])
def test_the_compiled_step_keeps_the_fusion_and_attends_over_its_span(config, monkeypatch):
    """The whole step compiled (``compile=True``) runs the fused products and sends each layer's
    attention to ``Ops.attention_span`` (on a CUDA GPU, one kernel over the slots in use), and
    decodes what the eager step does, past a cache growth (256) and sliding-window moves. It used
    to trace with the weights as graph inputs, which dropped the fusion for good."""
    from decode_runs import first_steps
    from lmx.runtime.ops import MlxOps

    model = model_of(config)
    eager = decode(model, PROMPT, 260, False)
    model.fuse_projections()
    spans = []
    original = MlxOps.attention_span

    def counted(self, q, k, v, scale, span):
        spans.append(k.shape[2])
        return original(self, q, k, v, scale, span)

    monkeypatch.setattr(MlxOps, "attention_span", counted)
    state = DecodeState(model)
    tokens, logprobs = first_steps(model, PROMPT, 260, compile=True, state=state)
    assert tokens == eager[0]
    np.testing.assert_allclose(logprobs, eager[1], rtol=0, atol=1e-5)
    assert len(spans) >= len(model.layers) and len(spans) % len(model.layers) == 0  # one a layer, per trace
    attn = model.layers[0].self_attn
    assert attn.fused is not None and attn.fused.holds([attn.q_proj, attn.k_proj, attn.v_proj])

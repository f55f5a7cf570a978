"""LoRA layers: gradients, save/load, unload, fuse (float and quantized bases). All in float32."""

from __future__ import annotations

import lmx  # isort: skip

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from lmx.errors import ModelNotFoundError, WeightsError
from lmx.loading import load_model
from lmx.train.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoRALinear,
    adapter_weights,
    apply_lora,
    has_adapter,
    load_adapter,
    save_adapter,
    unload_adapter,
)
from lmx.train.losses import mean_loss

TOKENS = mx.array([[2, 40, 41, 42, 43, 44, 45, 46, 47, 48], [2, 50, 51, 52, 53, 54, 55, 56, 57, 58]])


def _randomise_adapter(model: nn.Module, seed: int, scale: float = 0.05) -> None:
    """Give B (zero at init) random values so the adapter changes the output."""
    rng = np.random.default_rng(seed)
    for _, layer in model.named_modules():
        if isinstance(layer, LoRALinear):
            layer.lora_b = mx.array(rng.normal(0, scale, layer.lora_b.shape).astype(np.float32))
    mx.eval(model.parameters())


def _logits(model: nn.Module, ids: mx.array = TOKENS) -> np.ndarray:
    out = model(ids)
    mx.eval(out)
    return np.array(out)


def test_lora_gradients_match_finite_differences(tiny_dirs, arch):
    model = load_model(tiny_dirs[arch], dtype="float32").model
    apply_lora(model, rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"), seed=0)
    _randomise_adapter(model, 1)
    inputs, targets = TOKENS[:, :-1], TOKENS[:, 1:]
    weights = mx.array(np.tile((np.arange(9) >= 3).astype(np.float32), (2, 1)))

    def loss_of(m: nn.Module) -> mx.array:
        return mean_loss(m, inputs, targets, weights)

    _, grads = nn.value_and_grad(model, loss_of)(model)
    flat = dict(tree_flatten(grads))
    assert set(flat) == set(adapter_weights(model)), "only LoRA tensors are trainable"
    params = dict(tree_flatten(model.trainable_parameters()))
    eps = 1e-2
    checked = 0
    for name in (n for n in sorted(flat) if ".1." in n or ".0." in n):
        g = np.array(flat[name])
        # the coordinate with the largest gradient, and one picked at random
        coords = [np.unravel_index(np.abs(g).argmax(), g.shape)]
        coords.append(tuple(np.random.default_rng(len(name)).integers(0, s) for s in g.shape))
        for idx in coords:
            base = np.array(params[name])
            values = []
            for sign in (1, -1):
                bumped = base.copy()
                bumped[idx] += sign * eps
                model.update(tree_unflatten([(name, mx.array(bumped))]))
                values.append(loss_of(model).item())
            model.update(tree_unflatten([(name, mx.array(base))]))
            numeric = (values[0] - values[1]) / (2 * eps)
            assert numeric == pytest.approx(float(g[idx]), rel=2e-2, abs=2e-4), (name, idx)
            checked += 1
    assert checked >= 8


def test_fresh_adapter_leaves_outputs_unchanged(tiny_dirs):
    model = load_model(tiny_dirs["qwen3"], dtype="float32").model
    before = _logits(model)
    config = apply_lora(model, rank=4, alpha=8.0, num_layers=2, targets=("q_proj", "o_proj", "up_proj"), seed=3)
    assert all(".layers.1." in p or ".layers.2." in p for p in config.modules)  # the last 2 of 3 layers
    assert len(config.modules) == 6
    np.testing.assert_array_equal(_logits(model), before)
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert sorted(trainable) == sorted(adapter_weights(model))


def test_save_load_round_trip_and_unload(tiny_dirs, tmp_path):
    model = load_model(tiny_dirs["gemma3"], dtype="float32").model
    base = _logits(model)
    config = apply_lora(model, rank=4, alpha=16.0, seed=0)
    _randomise_adapter(model, 2)
    adapted = _logits(model)
    assert np.abs(adapted - base).max() > 1e-2
    save_adapter(model, tmp_path / "ad", config)
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]  # no temp files
    on_disk = json.loads((tmp_path / "ad" / ADAPTER_CONFIG).read_text())
    assert on_disk["rank"] == 4 and on_disk["alpha"] == 16.0 and on_disk["modules"] == list(config.modules)

    fresh = load_model(tiny_dirs["gemma3"], dtype="float32").model
    loaded = load_adapter(fresh, tmp_path / "ad")
    assert loaded.modules == config.modules
    for name, value in adapter_weights(model).items():
        np.testing.assert_array_equal(np.array(adapter_weights(fresh)[name]), np.array(value))
    np.testing.assert_allclose(_logits(fresh), adapted, atol=1e-5)
    # loading again replaces the adapter rather than stacking a second one
    load_adapter(fresh, tmp_path / "ad")
    np.testing.assert_allclose(_logits(fresh), adapted, atol=1e-5)
    assert unload_adapter(fresh) and not has_adapter(fresh)
    np.testing.assert_allclose(_logits(fresh), base, atol=1e-6)
    assert not unload_adapter(fresh)


def test_load_adapter_errors_name_the_problem(tiny_dirs, tmp_path):
    gemma = load_model(tiny_dirs["gemma3"], dtype="float32").model
    config = apply_lora(gemma, rank=2, alpha=4.0, seed=0)
    save_adapter(gemma, tmp_path / "g", config)
    qwen = load_model(tiny_dirs["qwen3"], dtype="float32").model
    before = _logits(qwen)
    with pytest.raises(WeightsError, match="model.layers.3"):  # gemma has 4 layers, qwen 3
        load_adapter(qwen, tmp_path / "g")
    assert not has_adapter(qwen)  # all or nothing
    np.testing.assert_array_equal(_logits(qwen), before)
    with pytest.raises(ModelNotFoundError, match="nowhere"):
        load_adapter(qwen, tmp_path / "nowhere")
    # a tensor of the wrong shape is named
    weights = dict(adapter_weights(gemma))
    name = sorted(weights)[0]
    weights[name] = mx.zeros((3, 3))
    mx.save_safetensors(str(tmp_path / "g" / ADAPTER_WEIGHTS), weights)
    with pytest.raises(WeightsError, match=name.replace(".", r"\.")):
        load_adapter(load_model(tiny_dirs["gemma3"], dtype="float32").model, tmp_path / "g")


def _read_metadata(path: Path) -> dict:
    _, metadata = mx.load(str(path), return_metadata=True)
    return metadata


def test_fused_model_logits_equal_base_plus_adapter(tiny_dirs, arch, tmp_path):
    from lmx.train.fuse import fuse

    model = load_model(tiny_dirs[arch], dtype="float32").model
    base = _logits(model)
    config = apply_lora(model, rank=4, alpha=8.0, seed=0)
    _randomise_adapter(model, 5)
    adapted = _logits(model)
    save_adapter(model, tmp_path / "ad", config)

    out = fuse(tiny_dirs[arch], tmp_path / "ad", tmp_path / "fused")
    assert _read_metadata(out / "model.safetensors") == {"format": "mlx"}
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file()
    with lmx.load(out, dtype="float32") as engine:
        assert not has_adapter(engine.model)
        fused = _logits(engine.model)
        assert engine.tokenizer.encode("Hello world") == load_model(tiny_dirs[arch], dtype="float32").tokenizer.encode(
            "Hello world"
        )
    np.testing.assert_allclose(fused, adapted, atol=1e-4)
    assert np.abs(fused - base).max() > 1e-2


def test_qlora_on_quantized_layers_and_fuse(tiny_dirs, tmp_path):
    from lmx.loading.convert import convert
    from lmx.train.fuse import fuse

    qdir = convert(tiny_dirs["gemma3"], tmp_path / "q8", q_bits=8, q_group_size=32)
    model = load_model(qdir, dtype="float32").model
    assert isinstance(model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    base = _logits(model)
    config = apply_lora(model, rank=4, alpha=8.0, seed=0)
    assert isinstance(model.layers[0].self_attn.q_proj.base, nn.QuantizedLinear)
    _randomise_adapter(model, 7)
    adapted = _logits(model)

    # gradients reach the adapter through the quantized matmul, and only the adapter
    inputs, targets = TOKENS[:, :-1], TOKENS[:, 1:]
    _, grads = nn.value_and_grad(model, mean_loss)(model, inputs, targets, mx.ones(targets.shape))
    flat = dict(tree_flatten(grads))
    assert set(flat) == set(adapter_weights(model))
    assert all(float(mx.abs(g).max()) > 0 for g in flat.values())
    save_adapter(model, tmp_path / "ad", config)

    exact = fuse(qdir, tmp_path / "ad", tmp_path / "deq", dequantize=True)
    assert "quantization" not in json.loads((exact / "config.json").read_text())
    with lmx.load(exact, dtype="float32") as engine:
        assert isinstance(engine.model.layers[0].self_attn.q_proj, nn.Linear)
        np.testing.assert_allclose(_logits(engine.model), adapted, atol=1e-4)

    requant = fuse(qdir, tmp_path / "ad", tmp_path / "req")
    assert json.loads((requant / "config.json").read_text())["quantization"] == {"group_size": 32, "bits": 8}
    with lmx.load(requant, dtype="float32") as engine:
        assert isinstance(engine.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
        approx = _logits(engine.model)
    # re-quantizing the merged weight costs a little precision, far less than the adapter's effect
    assert np.abs(approx - adapted).max() < 0.25 * np.abs(adapted - base).max()


def test_dropout_keys_fix_the_mask_and_are_not_parameters(tiny_dirs):
    from lmx.train.lora import set_dropout_keys

    model = load_model(tiny_dirs["qwen3"], dtype="float32").model
    apply_lora(model, rank=4, alpha=8.0, dropout=0.5, seed=0)
    _randomise_adapter(model, 3, scale=0.5)
    n_params = len(tree_flatten(model.parameters()))
    model.train()
    set_dropout_keys(model, mx.random.key(1))
    first, again = _logits(model), _logits(model)
    set_dropout_keys(model, mx.random.key(2))
    other = _logits(model)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3
    assert len(tree_flatten(model.parameters())) == n_params
    model.eval()  # inference never drops
    set_dropout_keys(model, None)
    np.testing.assert_array_equal(_logits(model), _logits(model))
    set_dropout_keys(model, mx.random.key(1))
    assert np.abs(_logits(model) - first).max() > 1e-3

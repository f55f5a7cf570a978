"""The segmented decode step (:mod:`lmx.generate.segments`) computes what the eager step computes.

It is lmx's default decode step on a GPU (the load profile's ``decode_mode``); here it is forced
on the CPU (``segments=True``).
Also the two op-saving pieces the eager step shares with it: ``Linear``'s kept ``weight.T``
and :func:`split_heads`/:func:`merge_heads` without a transpose for one position.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from decode_runs import first_steps
from lmx import bench
from lmx.generate.step import DecodeState
from lmx.models import build_model
from lmx.models.base import Linear, merge_heads, split_heads


def decode(model, prompt, n: int, segments: bool, pad=None, state=None) -> tuple[list[list[int]], np.ndarray]:
    return first_steps(model, prompt, n, pad=pad, segments=segments, state=state)


@pytest.mark.parametrize("config", ["tiny-gemma3", "tiny-qwen3", "tiny-qwen3-moe"])
@pytest.mark.parametrize("rows", [1, 2])
def test_segmented_decode_equals_eager_decode(config, rows):
    # 300 steps: past the first KV-cache growth (256) and several sliding-window wraps (Gemma's is 16).
    model = build_model(bench.config_for(config))
    bench.random_weights(model, mx.float32, seed=1)
    prompt = mx.random.randint(0, 512, (rows, 24), key=mx.random.key(3))
    state = DecodeState(model)
    eager, segmented = decode(model, prompt, 300, False), decode(model, prompt, 300, True, state=state)
    assert state.segments_made  # the segments did run
    assert segmented[0] == eager[0]
    np.testing.assert_allclose(segmented[1], eager[1], rtol=0, atol=1e-5)


def test_segmented_decode_sees_updated_weights():
    model = build_model(bench.config_for("tiny-qwen3"))
    bench.random_weights(model, mx.float32, seed=2)
    prompt = mx.array([[5, 6, 7, 8]])
    state = DecodeState(model)  # the traces of the first call are kept for the second
    before = decode(model, prompt, 3, True, state=state)[1]
    model.update({"lm_head": {"weight": model.lm_head.weight * 2}})
    after, eager = decode(model, prompt, 3, True, state=state)[1], decode(model, prompt, 3, False)[1]
    assert not np.allclose(after[1:], before[1:])  # steps after the first come from the segments
    np.testing.assert_allclose(after, eager, rtol=0, atol=1e-5)


def test_segments_only_where_they_apply():
    model = build_model(bench.config_for("tiny-gemma3"))
    bench.random_weights(model, mx.float32, seed=4)
    prompt = mx.random.randint(0, 512, (2, 12), key=mx.random.key(5))
    state = DecodeState(model)
    decode(model, prompt, 4, None, state=state)  # the portable plan (the CPU's): the eager step
    assert not state.segments_made
    pad = mx.array([0, 3])
    eager = decode(model, prompt, 20, False, pad=pad)
    forced = decode(model, prompt, 20, True, pad=pad, state=state)  # padded rows need a mask: eager step
    assert not state.segments_made
    assert forced[0] == eager[0]


def test_segments_with_lora_layers():
    from lmx.train.lora import apply_lora

    model = build_model(bench.config_for("tiny-gemma3"))
    bench.random_weights(model, mx.float32, seed=6)
    apply_lora(model, rank=2, alpha=4.0, dropout=0.1, seed=0)
    for _, layer in model.named_modules():  # a trained-looking update, not B = 0
        if "lora_b" in layer:
            layer.lora_b = mx.random.normal(layer.lora_b.shape, key=mx.random.key(7)) * 0.1
    state = DecodeState(model)
    assert state.segmented() is None  # dropout draws random numbers while training
    model.eval()
    assert state.segmented() is not None
    prompt = mx.random.randint(0, 512, (1, 12), key=mx.random.key(8))
    eager, segmented = decode(model, prompt, 40, False), decode(model, prompt, 40, True)
    assert segmented[0] == eager[0]
    np.testing.assert_allclose(segmented[1], eager[1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_linear_keeps_its_transpose_and_follows_updates(bias):
    ours, reference = Linear(8, 6, bias=bias), nn.Linear(8, 6, bias=bias)
    reference.update(ours.parameters())
    x = mx.random.normal((2, 3, 8), key=mx.random.key(0))
    assert mx.array_equal(ours(x), reference(x)).item()
    new = {"weight": ours.weight + 1}
    ours.update(new)
    reference.update(new)
    assert mx.array_equal(ours(x), reference(x)).item()


@pytest.mark.parametrize("length", [1, 5])
def test_split_and_merge_heads_match_reshape_and_transpose(length):
    x = mx.random.normal((2, length, 3 * 4), key=mx.random.key(1))
    norm = nn.RMSNorm(4)
    norm.weight = mx.arange(4, dtype=mx.float32) / 4
    expected = norm(x.reshape(2, length, 3, 4)).transpose(0, 2, 1, 3)  # (B, heads, L, D)
    heads = split_heads(x, 3, norm)
    assert heads.shape == (2, 3, length, 4)
    assert mx.array_equal(heads, expected).item()
    assert mx.array_equal(merge_heads(split_heads(x, 3)), x).item()


@pytest.mark.parametrize("config", ["tiny-gemma3", "tiny-qwen3", "tiny-qwen3-moe"])
def test_layerwise_prefill_equals_whole_prefill(config):
    """The GPU's default prefill hands each layer to the device as it is built: same logits and caches."""
    from lmx.generate.step import prefill

    model = build_model(bench.config_for(config))
    bench.random_weights(model, mx.float32, seed=4)
    prompt = mx.random.randint(0, 512, (2, 40), key=mx.random.key(5))  # 3 chunks of 16
    results = []
    for layerwise in (False, True):
        cache = model.make_cache()
        logits = prefill(model, prompt, cache, step_size=16, layerwise=layerwise)
        results.append((np.array(logits), [np.array(a) for c in cache for a in c.state]))
    (whole, whole_cache), (layered, layered_cache) = results
    np.testing.assert_array_equal(layered, whole)
    for a, b in zip(layered_cache, whole_cache, strict=True):
        np.testing.assert_array_equal(a, b)

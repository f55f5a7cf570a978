"""Forward passes of every architecture against transformers on the same random weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lmx  # noqa: F401  # isort: skip
import mlx.core as mx

from lmx.errors import ConfigError, UnsupportedModelError, WeightsError
from lmx.io import hf
from lmx.models import build_model
from lmx.models.cache import KVCache, RotatingKVCache, trim_caches


def load_tiny(path, dtype=mx.float32):
    config = hf.read_json(path / "config.json")
    model = build_model(config)
    hf.apply_weights(model, model.sanitize(hf.read_safetensors(hf.weight_files(path))), str(path), dtype)
    return model


def ref_logits(ref, ids: np.ndarray, dtype=torch.float32, attention_mask=None) -> np.ndarray:
    with torch.no_grad():
        model = ref.to(dtype)
        out = model(torch.tensor(ids), attention_mask=None if attention_mask is None else torch.tensor(attention_mask))
        ref.to(torch.float32)
        return out.logits.float().numpy()


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


IDS = np.random.RandomState(0).randint(3, 300, size=(1, 40))  # 40 > Gemma's window of 8


def test_fp32_logits_match_reference(arch, tiny_dirs, references):
    model = load_tiny(tiny_dirs[arch])
    ours = np.array(model(mx.array(IDS)))
    assert rel_err(ours, ref_logits(references[arch], IDS)) < 1e-4


def test_bf16_logits_close_to_reference(arch, tiny_dirs, references):
    model = load_tiny(tiny_dirs[arch], mx.bfloat16)
    ours = np.array(model(mx.array(IDS)).astype(mx.float32))
    ref = ref_logits(references[arch], IDS, torch.bfloat16)
    assert rel_err(ours, ref) < 5e-2
    # and bf16 is still a faithful model: the top token agrees almost everywhere
    agree = (ours.argmax(-1) == ref.argmax(-1)).mean()
    assert agree >= 0.9


def test_cached_decode_equals_full_forward(arch, tiny_dirs):
    model = load_tiny(tiny_dirs[arch])
    full = np.array(model(mx.array(IDS)))
    cache = model.make_cache()
    steps = [np.array(model(mx.array(IDS[:, :3]), cache))]
    steps += [np.array(model(mx.array(IDS[:, t : t + 1]), cache)) for t in range(3, IDS.shape[1])]
    assert rel_err(np.concatenate(steps, axis=1), full) < 1e-5


@pytest.mark.parametrize("chunk", [3, 5, 11])
def test_chunked_prefill_wraps_rotating_cache(tiny_dirs, chunk):
    """Gemma's window is 8: chunks after the wrap must still see exactly their window."""
    model = load_tiny(tiny_dirs["gemma3"])
    full = np.array(model(mx.array(IDS)))
    cache = model.make_cache()
    assert any(isinstance(c, RotatingKVCache) for c in cache)
    for c in cache:
        if isinstance(c, RotatingKVCache):
            c.slack = 4  # force compaction many times over 40 tokens
    parts = [np.array(model(mx.array(IDS[:, s : s + chunk]), cache)) for s in range(0, IDS.shape[1], chunk)]
    assert rel_err(np.concatenate(parts, axis=1), full) < 1e-5


def test_trim_then_refeed_is_exact(arch, tiny_dirs):
    model = load_tiny(tiny_dirs[arch])
    full = np.array(model(mx.array(IDS)))
    cache = model.make_cache()
    model(mx.array(IDS[:, :30]), cache)
    for t in range(30, 36):
        model(mx.array(IDS[:, t : t + 1]), cache)
    assert trim_caches(cache, 4)  # back to 32 tokens
    assert all(c.offset == 32 for c in cache)
    tail = np.array(model(mx.array(IDS[:, 32:]), cache))
    assert rel_err(tail, full[:, 32:]) < 1e-5


@pytest.mark.parametrize("n", [1, 10, 256, 257, 555, 556, 557, 700, 1500])
def test_rotating_cache_grows_in_blocks_up_to_its_bound(n):
    """A sliding-window cache allocates as a growing one does (blocks of 256) until window + slack, then
    keeps that size and drops the oldest positions; it holds every position it has room for, in order, and
    its bytes are the figure admission computes (memory.kv_cache_bytes)."""
    from lmx.runtime import memory
    from lmx.runtime.memory import room

    cache = RotatingKVCache(window=300, slack=256)
    for start in range(0, n, 7):  # 7-position chunks
        chunk = mx.arange(start, min(n, start + 7), dtype=mx.float32).reshape(1, 1, -1, 1)
        cache.update_and_fetch(chunk, -chunk)
    assert cache.keys.shape[2] == min(room(n, 256), 556)
    assert cache.nbytes == memory.kv_cache_bytes([300], 1, 1, n, 4)
    keys, values = cache.state
    held = keys.shape[2]
    assert held >= min(n, 300)  # at least the window
    assert keys.reshape(-1).tolist() == list(range(n - held, n))
    assert values.reshape(-1).tolist() == [-float(p) for p in range(n - held, n)]


def test_rotating_cache_refuses_inexact_trim():
    cache = RotatingKVCache(window=4, slack=2)
    k = mx.zeros((1, 1, 1, 2))
    for _ in range(20):
        cache.update_and_fetch(k, k)
    assert cache.can_trim(1)
    assert not cache.can_trim(10)
    with pytest.raises(ValueError):
        cache.trim(10)
    assert KVCache().can_trim(0)


def test_padded_batch_matches_single_rows(arch, tiny_dirs):
    model = load_tiny(tiny_dirs[arch])
    a, b = IDS[0, :23].tolist(), IDS[0, 5:].tolist()  # 23 and 35 tokens
    pad = len(b) - len(a)
    batch = mx.array([[0] * pad + a, b])
    logits = np.array(model(batch, model.make_cache(), mx.array([pad, 0])))
    alone_a = np.array(model(mx.array([a])))
    alone_b = np.array(model(mx.array([b])))
    assert rel_err(logits[0:1, pad:], alone_a) < 1e-4
    assert rel_err(logits[1:2], alone_b) < 1e-4
    # decode one more token for both rows through the cache
    cache = model.make_cache()
    pads = mx.array([pad, 0])
    model(batch, cache, pads)
    nxt = np.array(model(mx.array([[7], [9]]), cache, pads))
    assert rel_err(nxt[0:1], np.array(model(mx.array([a + [7]])))[:, -1:]) < 1e-4
    assert rel_err(nxt[1:2], np.array(model(mx.array([b + [9]])))[:, -1:]) < 1e-4


def test_multimodal_gemma3_config_and_names(tiny_dirs):
    """A multimodal ``gemma3`` checkpoint (transformers 5 names) runs text prompts as its text half does."""
    from mlx.utils import tree_flatten

    from tiny_models import VISION, gemma_config

    text = load_tiny(tiny_dirs["gemma3"])
    weights = dict(hf.read_safetensors(hf.weight_files(tiny_dirs["gemma3"])))
    mm_weights = {k.replace("model.", "model.language_model.", 1): v for k, v in weights.items()}
    config = {"model_type": "gemma3", "text_config": gemma_config(), "vision_config": VISION, "mm_tokens_per_image": 16}
    model = build_model(config)
    for name, w in tree_flatten(model.parameters()):
        if name.startswith(("vision_tower.", "multi_modal_projector.")):
            mm_weights["model." + name] = w
    hf.apply_weights(model, model.sanitize(mm_weights), "mm")
    assert np.array_equal(np.array(model(mx.array(IDS))), np.array(text(mx.array(IDS))))
    del mm_weights["model.multi_modal_projector.mm_input_projection_weight"]
    with pytest.raises(WeightsError, match="mm_input_projection_weight"):
        hf.apply_weights(build_model(config), build_model(config).sanitize(mm_weights), "mm")


def test_strict_loading_names_the_tensor(tiny_dirs):
    path = tiny_dirs["qwen3"]
    config = hf.read_json(path / "config.json")
    weights = hf.read_safetensors(hf.weight_files(path))
    model = build_model(config)
    missing = dict(weights)
    del missing["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(WeightsError, match=r"missing tensor\(s\): model\.layers\.1\.mlp\.up_proj\.weight"):
        hf.apply_weights(model, model.sanitize(missing), "x")
    extra = dict(weights, **{"model.layers.9.foo.weight": mx.zeros((2,))})
    with pytest.raises(WeightsError, match=r"unexpected tensor\(s\): model\.layers\.9\.foo\.weight"):
        hf.apply_weights(model, model.sanitize(extra), "x")
    bad = dict(weights, **{"model.norm.weight": mx.zeros((3,))})
    with pytest.raises(WeightsError, match=r"model\.norm\.weight has shape \(3,\), expected \(64,\)"):
        hf.apply_weights(model, model.sanitize(bad), "x")


def test_config_errors_are_typed():
    with pytest.raises(UnsupportedModelError, match="'llama4'.*supported: gemma3, gemma3_text, qwen3"):
        build_model({"model_type": "llama4"})
    with pytest.raises(ConfigError, match="missing the required key 'hidden_size'"):
        build_model({"model_type": "qwen3", "num_hidden_layers": 1})
    with pytest.raises(ConfigError, match="'hidden_size' must be int, got '64'"):
        build_model(
            {
                "model_type": "qwen3",
                "hidden_size": "64",
                "num_hidden_layers": 1,
                "intermediate_size": 8,
                "num_attention_heads": 2,
                "vocab_size": 10,
            }
        )
    with pytest.raises(ConfigError, match="layer_types has 1 entries for 2 layers"):
        build_model({"model_type": "gemma3_text", "num_hidden_layers": 2, "layer_types": ["full_attention"]})

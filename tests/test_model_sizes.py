"""Published configs of Gemma 3 1B-27B and Qwen 3 0.6B-32B build and run (random weights, 2 layers).

The configs are the published config.json files' architecture keys; only the layer count
is cut so the test fits a small machine. Shapes (heads, head_dim, GQA, vocab, untied head,
multimodal text_config) are the real ones.
"""

from __future__ import annotations

import math

import pytest

import lmx  # noqa: F401  # isort: skip
import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from lmx.models import build_model

GEMMA_1B = {
    "model_type": "gemma3_text",
    "hidden_size": 1152,
    "intermediate_size": 6912,
    "num_hidden_layers": 26,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "sliding_window": 512,
    "sliding_window_pattern": 6,
    "rope_theta": 1000000,
    "rope_local_base_freq": 10000,
    "rope_scaling": None,
    "max_position_embeddings": 32768,
    "vocab_size": 262144,
    "eos_token_id": [1, 106],
}


def _multimodal(text_config: dict) -> dict:
    return {
        "model_type": "gemma3",
        "text_config": {"model_type": "gemma3_text", **text_config},
        "vision_config": {"model_type": "siglip_vision_model"},
        "eos_token_id": [1, 106],
    }


LINEAR8 = {"factor": 8.0, "rope_type": "linear"}
GEMMA_4B = _multimodal(
    {
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "num_hidden_layers": 34,
        "rope_scaling": LINEAR8,
        "sliding_window": 1024,
    }
)
GEMMA_12B = _multimodal(
    {
        "hidden_size": 3840,
        "intermediate_size": 15360,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "num_hidden_layers": 48,
        "rope_scaling": LINEAR8,
        "sliding_window": 1024,
    }
)
GEMMA_27B = _multimodal(
    {
        "head_dim": 128,
        "hidden_size": 5376,
        "intermediate_size": 21504,
        "num_attention_heads": 32,
        "num_hidden_layers": 62,
        "num_key_value_heads": 16,
        "query_pre_attn_scalar": 168,
        "rope_scaling": LINEAR8,
        "sliding_window": 1024,
    }
)


def _qwen(hidden: int, inter: int, layers: int, heads: int, tied: bool) -> dict:
    return {
        "model_type": "qwen3",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "max_position_embeddings": 40960,
        "rope_theta": 1000000,
        "rope_scaling": None,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": tied,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": layers,
    }


CONFIGS = {
    "gemma3-1b": GEMMA_1B,
    "gemma3-4b": GEMMA_4B,
    "gemma3-12b": GEMMA_12B,
    "gemma3-27b": GEMMA_27B,
    "qwen3-0.6b": _qwen(1024, 3072, 28, 16, True),
    "qwen3-1.7b": _qwen(2048, 6144, 28, 16, True),
    "qwen3-4b": _qwen(2560, 9728, 36, 32, True),
    "qwen3-8b": _qwen(4096, 12288, 36, 32, False),
    "qwen3-14b": _qwen(5120, 17408, 40, 40, False),
    "qwen3-32b": _qwen(5120, 25600, 64, 64, False),
}


def _cut(config: dict, layers: int) -> dict:
    config = dict(config)
    if "text_config" in config:
        config["text_config"] = dict(config["text_config"], num_hidden_layers=layers)
    else:
        config["num_hidden_layers"] = layers
    return config


def _cheap_init(model) -> None:
    """bf16 weights made by tiling 64 random rows: full shapes, seconds instead of minutes."""
    params = []
    for name, p in tree_flatten(model.parameters()):
        rows = p.shape[0]
        base = mx.random.normal((min(rows, 64), *p.shape[1:]), dtype=mx.bfloat16) * 0.02
        if "norm" in name:
            base = base + 1.0
        params.append((name, mx.tile(base, (math.ceil(rows / base.shape[0]),) + (1,) * (p.ndim - 1))[:rows]))
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_published_config_runs(name):
    layers = 6 if name.startswith("gemma3") else 2  # Gemma: keep one global layer (every 6th)
    model = build_model(_cut(CONFIGS[name], layers))
    _cheap_init(model)
    args = model.args
    cache = model.make_cache()
    assert len(cache) == layers
    if name.startswith("gemma3"):
        assert args.layer_types[-1] == "full_attention" and args.layer_types[0] == "sliding_attention"
        assert args.vocab_size in (262144, 262208)
    prompt = mx.array([[2, 10, 20, 30, 40]])
    h = model.hidden(prompt, cache)
    logits = model.head(h[:, -1:])
    step = model.head(model.hidden(mx.array([[50]]), cache))
    mx.eval(logits, step)
    assert h.shape == (1, 5, args.hidden_size)
    assert logits.shape == (1, 1, args.vocab_size) and step.shape == (1, 1, args.vocab_size)
    assert bool(mx.isfinite(logits.astype(mx.float32)).all()) and bool(mx.isfinite(step.astype(mx.float32)).all())
    assert all(c.offset == 6 for c in cache)
    attn = model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (args.num_attention_heads * args.head_dim, args.hidden_size)
    assert attn.k_proj.weight.shape == (args.num_key_value_heads * args.head_dim, args.hidden_size)
    assert hasattr(model, "lm_head") == (not args.tie_word_embeddings)

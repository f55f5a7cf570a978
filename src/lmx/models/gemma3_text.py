"""Gemma 3 (text): transformers' ``Gemma3ForCausalLM`` semantics on MLX.

Also serves multimodal ``gemma3`` checkpoints: the text config is taken from
``text_config`` and the vision tower's weights are dropped.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from lmx.models.base import (
    AttentionLayer,
    BaseModelArgs,
    Linear,
    QKNormAttention,
    RoPE,
    cpu_ops,
    geglu_tanh,
    layer_types_from,
    rope_settings,
)
from lmx.models.cache import KVCache, RotatingKVCache


@dataclasses.dataclass
class ModelArgs(BaseModelArgs):
    # Defaults are transformers' Gemma3TextConfig defaults: published multimodal configs
    # (4B/12B/27B) write only the keys that differ from them in text_config.
    model_type: str = "gemma3_text"
    hidden_size: int = 2304
    num_hidden_layers: int = 26
    intermediate_size: int = 9216
    num_attention_heads: int = 8
    vocab_size: int = 262_208
    num_key_value_heads: int = 4
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    query_pre_attn_scalar: float = 256.0
    sliding_window: int = 4096
    sliding_window_pattern: int = 6
    layer_types: list | None = None
    rope_theta: float = 1_000_000.0
    rope_local_base_freq: float = 10_000.0
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None
    max_position_embeddings: int = 131_072
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    attention_bias: bool = False
    hidden_activation: str = "gelu_pytorch_tanh"
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        # Gemma 3: every sliding_window_pattern-th layer is global, the rest slide.
        default = [
            "sliding_attention" if (i + 1) % self.sliding_window_pattern else "full_attention"
            for i in range(self.num_hidden_layers)
        ]
        self.layer_types = layer_types_from(self.layer_types, self.num_hidden_layers, default)


def from_config(config: dict[str, Any]) -> dict[str, Any]:
    """Take the text part of a multimodal ``gemma3`` config; pass a text config through."""
    if config.get("model_type") == "gemma3":
        text = dict(config.get("text_config") or {})
        text["model_type"] = "gemma3_text"
        text.setdefault("tie_word_embeddings", config.get("tie_word_embeddings", True))
        return text
    return config


class RMSNorm(nn.Module):
    """Gemma's RMSNorm scales by ``1 + weight`` (the checkpoint stores the offset from 1)."""

    def __init__(self, dims: int, eps: float) -> None:
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    uses_cpu_ops = True  # see lmx.models.base.use_cpu_ops

    def __call__(self, x: mx.array) -> mx.array:
        ops = cpu_ops(self)
        if ops is not None:
            return ops.rms_norm(x, self._scale(), self.eps)
        return mx.fast.rms_norm(x, self._scale(), self.eps)

    def constants(self) -> list[mx.array]:
        """Arrays derived from the weights and kept between calls (compiled steps read them)."""
        return [self._scale()]

    def _scale(self) -> mx.array:
        # 1 + weight once per weight array, not once per call: on a GPU every op is a kernel
        # launch, and a decode step of Gemma 3 270M would spend 109 of them on this add.
        weight = self.weight
        cached = self.__dict__.get("_scale_of")
        if cached is None or cached[0] is not weight:
            cached = (weight, 1.0 + weight)
            object.__setattr__(self, "_scale_of", cached)  # an attribute, not a parameter
        return cached[1]


class Attention(QKNormAttention):
    def __init__(self, args: ModelArgs, layer_idx: int) -> None:
        super().__init__()
        dim, self.n_heads, self.n_kv_heads = (
            args.hidden_size,
            args.num_attention_heads,
            args.num_key_value_heads,
        )
        self.head_dim = args.head_dim
        self.scale = args.query_pre_attn_scalar**-0.5  # not head_dim**-0.5
        self.softcap = args.attn_logit_softcapping
        bias = args.attention_bias
        self.q_proj = Linear(dim, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, dim, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
        layer_type = args.layer_types[layer_idx]
        sliding = layer_type == "sliding_attention"
        # Local layers use their own base and never the global rope scaling.
        settings = rope_settings(
            args.rope_parameters,
            None if sliding else args.rope_scaling,
            args.rope_local_base_freq if sliding else args.rope_theta,
            layer_type,
        )
        self.rope = RoPE(self.head_dim, settings, args.max_position_embeddings)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = Linear(dim, hidden, bias=False)
        self.up_proj = Linear(dim, hidden, bias=False)
        self.down_proj = Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(geglu_tanh(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(AttentionLayer):
    def __init__(self, args: ModelArgs, layer_idx: int) -> None:
        super().__init__()
        dim, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = Attention(args, layer_idx)
        self.mlp = MLP(dim, args.intermediate_size)
        self.input_layernorm = RMSNorm(dim, eps)
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.pre_feedforward_layernorm = RMSNorm(dim, eps)
        self.post_feedforward_layernorm = RMSNorm(dim, eps)

    def end(self, x: mx.array, out: mx.array) -> mx.array:
        """The layer after attention: the residual stream ``x`` plus attention ``out`` and the MLP."""
        h = x + self.post_attention_layernorm(self.self_attn.output(out, x.ndim))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class TextModel(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.hidden_size = args.hidden_size
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache: list[KVCache], pad: mx.array | None = None) -> mx.array:
        h = self.embed(inputs)
        for layer, layer_cache in zip(self.layers, cache):
            h = layer(h, layer_cache, pad)
        return self.norm(h)

    def embed(self, inputs: mx.array) -> mx.array:
        """The residual stream (B, L, hidden_size) the first layer reads."""
        h = self.embed_tokens(inputs)
        # The reference rounds sqrt(hidden_size) to the weights' dtype before scaling.
        return h * mx.array(self.hidden_size**0.5, dtype=mx.float32).astype(h.dtype)


class Model(nn.Module):
    """Gemma 3 causal LM: ``hidden`` -> ``head``; ``__call__`` does both."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model = TextModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)

    def hidden(self, inputs: mx.array, cache: list[KVCache], pad: mx.array | None = None) -> mx.array:
        """Final-norm hidden states (B, L, hidden_size)."""
        return self.model(inputs, cache, pad)

    def head(self, h: mx.array) -> mx.array:
        """Logits (B, L, vocab) from hidden states."""
        if self.args.tie_word_embeddings:
            logits = self.model.embed_tokens.as_linear(h)
        else:
            logits = self.lm_head(h)
        cap = self.args.final_logit_softcapping
        return logits if cap is None else mx.tanh(logits / cap) * cap

    def __call__(self, inputs: mx.array, cache: list[KVCache] | None = None, pad: mx.array | None = None) -> mx.array:
        return self.head(self.hidden(inputs, cache or self.make_cache(), pad))

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.layers

    def make_cache(self) -> list[KVCache]:
        """One cache per layer: rotating for sliding layers, growing for global ones."""
        return [
            RotatingKVCache(self.args.sliding_window) if t == "sliding_attention" else KVCache()
            for t in self.args.layer_types
        ]

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map HF names (text-only or multimodal checkpoints) to this module's names."""
        out = {}
        for name, w in weights.items():
            if "rotary_emb" in name or name.startswith(("vision_tower", "multi_modal_projector")):
                continue
            if name.startswith(("model.vision_tower", "model.multi_modal_projector")):
                continue
            for old, new in (
                ("model.language_model.", "model."),
                ("language_model.model.", "model."),
                ("language_model.lm_head.", "lm_head."),
            ):
                if name.startswith(old):
                    name = new + name[len(old) :]
            out[name] = w
        if self.args.tie_word_embeddings:
            out.pop("lm_head.weight", None)  # a tied head is the embedding itself
        return out

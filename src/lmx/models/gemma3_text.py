"""Gemma 3 (text): transformers' ``Gemma3ForCausalLM`` semantics on MLX.

Its ``from_config`` takes the text part of a multimodal ``gemma3`` config, and ``sanitize`` drops a
vision tower's weights: :mod:`lmx.models.gemma3` (images) builds on this model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from lmx.io.gguf import GGUFArchitecture, meta, positive
from lmx.models.base import (
    AttentionLayer,
    BaseModelArgs,
    CausalLM,
    DecoderStack,
    Derived,
    GatedMLP,
    Linear,
    OpsSlot,
    QKNormAttention,
    layer_types_from,
)
from lmx.models.gguf_layers import decode_blocks, decode_rows, norm_scales
from lmx.models.rope import RoPE, rope_settings


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


def _one_plus(weight: mx.array) -> mx.array:
    return 1.0 + weight


class RMSNorm(nn.Module):
    """Gemma's RMSNorm scales by ``1 + weight`` (the checkpoint stores the offset from 1)."""

    def __init__(self, dims: int, eps: float, ops: OpsSlot | None = None) -> None:
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps
        self.ops_slot = ops or OpsSlot()
        # 1 + weight once per weight array, not once per call: where every op is a kernel
        # launch, a decode step of Gemma 3 270M would spend 109 of them on this add.
        self.one_plus_weight = Derived(_one_plus)

    def __call__(self, x: mx.array) -> mx.array:
        return self.ops_slot.ops.rms_norm(x, self.scale(), self.eps)

    def constants(self) -> list[mx.array]:
        """Arrays derived from the weights and kept between calls (compiled steps read them)."""
        return [self.scale()]

    def scale(self) -> mx.array:
        """What the normed values are multiplied by: ``1 + weight``."""
        return self.one_plus_weight.of(self.weight)


class Attention(QKNormAttention):
    def __init__(self, args: ModelArgs, layer_idx: int, ops: OpsSlot) -> None:
        super().__init__(ops)
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
        self.q_norm = RMSNorm(self.head_dim, args.rms_norm_eps, ops)
        self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps, ops)
        layer_type = args.layer_types[layer_idx]
        sliding = layer_type == "sliding_attention"
        # Local layers use their own base and never the global rope scaling.
        settings = rope_settings(
            args.rope_parameters,
            None if sliding else args.rope_scaling,
            args.rope_local_base_freq if sliding else args.rope_theta,
            layer_type,
        )
        self.rope = RoPE(self.head_dim, settings, args.max_position_embeddings, ops)


class MLP(GatedMLP):
    def __init__(self, dim: int, hidden: int, ops: OpsSlot | None = None) -> None:
        super().__init__(ops)
        self.gate_proj = Linear(dim, hidden, bias=False)
        self.up_proj = Linear(dim, hidden, bias=False)
        self.down_proj = Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down(self.ops_slot.ops.gelu_tanh_mul(*self.gate_up(x)))


class DecoderLayer(AttentionLayer):
    def __init__(self, args: ModelArgs, layer_idx: int, ops: OpsSlot) -> None:
        super().__init__()
        dim, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = Attention(args, layer_idx, ops)
        self.mlp = MLP(dim, args.intermediate_size, ops)
        self.input_layernorm = RMSNorm(dim, eps, ops)
        self.post_attention_layernorm = RMSNorm(dim, eps, ops)
        self.pre_feedforward_layernorm = RMSNorm(dim, eps, ops)
        self.post_feedforward_layernorm = RMSNorm(dim, eps, ops)

    def end(self, x: mx.array, out: mx.array) -> mx.array:
        """The layer after attention: the residual stream ``x`` plus attention ``out`` and the MLP."""
        kernels = self.self_attn.ops_slot.ops.decode_layer_kernels()
        if kernels is not None and (fused := self._fused_end(kernels, x, out)) is not None:
            return fused
        h = x + self.post_attention_layernorm(self.self_attn.output(out, x.ndim))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))

    def _fused_end(self, kernels: Any, x: mx.array, out: mx.array) -> mx.array | None:
        """:meth:`end` of one decode position as one op of lmx's CPU kernels (the same values), where
        the projections are GGUF blocks; else None."""
        mlp = self.mlp
        blocks = decode_blocks((self.self_attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        norms = norm_scales(
            (self.post_attention_layernorm, self.pre_feedforward_layernorm, self.post_feedforward_layernorm)
        )
        if blocks is None or norms is None or not decode_rows(x) or out.dtype != mx.float32:
            return None
        (post_attn, pre_ffn, post_ffn), eps = norms
        (wo, to), (wg, tg), (wu, tu), (wd, td) = blocks
        return kernels.decode_layer_end(x, out, wo, post_attn, pre_ffn, wg, wu, wd, post_ffn, [to, tg, tu, td], eps)


class TextModel(DecoderStack):
    def __init__(self, args: ModelArgs, ops: OpsSlot) -> None:
        super().__init__()
        self.hidden_size = args.hidden_size
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i, ops) for i in range(args.num_hidden_layers)]
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, ops)

    def embed(self, inputs: mx.array) -> mx.array:
        """The residual stream (B, L, hidden_size) the first layer reads."""
        h = self.embed_tokens(inputs)
        # The reference rounds sqrt(hidden_size) to the weights' dtype before scaling.
        return h * mx.array(self.hidden_size**0.5, dtype=mx.float32).astype(h.dtype)


class Model(CausalLM):
    """Gemma 3 causal LM (the :class:`lmx.models.base.LanguageModel` contract): sliding layers get
    rotating caches; logits are soft-capped where the config says so."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__(args)
        self.model = TextModel(args, self.ops_slot)
        if not args.tie_word_embeddings:
            self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)

    def head(self, h: mx.array) -> mx.array:
        """Logits (B, L, vocab) from hidden states."""
        logits = super().head(h)
        cap = self.args.final_logit_softcapping
        return logits if cap is None else mx.tanh(logits / cap) * cap

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


# ---------------------------------------------------------------------------------------------------------------
# What the loading side reads of this architecture (lmx.loading, lmx.bench; through models/__init__.py).

HF_ARCHITECTURE = "Gemma3ForCausalLM"  # config.json "architectures" of a converted checkpoint


def _gguf_config(md: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    layers, head_dim = config["num_hidden_layers"], config["head_dim"]
    # llama.cpp's Gemma 3 pattern: five sliding layers, then one global; a file may state it per layer
    pattern = meta(md, "gemma3", "attention.sliding_window_pattern", 6)
    period = pattern if isinstance(pattern, int) and not isinstance(pattern, bool) and pattern > 0 else 6
    if isinstance(pattern, list) and len(pattern) == layers:
        sliding = [bool(p) for p in pattern]
    else:
        sliding = [(i + 1) % period != 0 for i in range(layers)]
    if meta(md, "gemma3", "attention.scale") is not None:
        query_pre_attn_scalar = 1.0 / positive(md, "gemma3", "attention.scale", integer=False) ** 2
    elif layers == 62:
        # Gemma 3 27B scales queries by hidden_size / heads, the others by head_dim (as llama.cpp does)
        query_pre_attn_scalar = config["hidden_size"] // config["num_attention_heads"]
    else:
        query_pre_attn_scalar = head_dim
    return {
        "sliding_window": positive(md, "gemma3", "attention.sliding_window", 4096),
        "sliding_window_pattern": period,
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
        "rope_local_base_freq": positive(md, "gemma3", "rope.freq_base_swa", 10_000.0, integer=False),
        "query_pre_attn_scalar": query_pre_attn_scalar,
        "hidden_activation": "gelu_pytorch_tanh",
    }


GGUF = GGUFArchitecture(
    name="gemma3",
    model_type="gemma3_text",
    # Gemma has four norms per layer (the others call the pre-MLP norm post_attention_layernorm).
    layer_names={
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
    norm_offset=1.0,  # llama.cpp stores Gemma's RMSNorm weights as 1 + w
    rope_theta=1e6,
    config=_gguf_config,
)

# Used when a GGUF file carries no template (the bundled Gemma 3 270M carries none).
CHAT_TEMPLATE = """{{- bos_token -}}
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- set first = messages[0]['content'] if messages[0]['content'] is string
      else messages[0]['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%}
  {%- set prefix = first + '\\n\\n' -%}
  {%- set turns = messages[1:] -%}
{%- else -%}
  {%- set prefix = '' -%}
  {%- set turns = messages -%}
{%- endif -%}
{%- for message in turns -%}
  {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
    {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}
  {%- endif -%}
  {{- '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' -}}
  {{- prefix if loop.first else '' -}}
  {%- if message['content'] is string -%}
    {{- message['content'] | trim -}}
  {%- else -%}
    {%- for part in message['content'] -%}
      {%- if part['type'] == 'image' -%}{{- '<start_of_image>' -}}
      {%- elif part['type'] == 'text' -%}{{- part['text'] | trim -}}{%- endif -%}
    {%- endfor -%}
  {%- endif -%}
  {{- '<end_of_turn>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}
"""

# Turn terminators that end a chat reply, beyond the file's EOS (as generation_config.json lists).
EXTRA_EOS_TOKENS = ("<end_of_turn>",)

NEUTRAL_NORM_WEIGHT = 0.0  # RMSNorm scales by 1 + weight: random bench weights are drawn around this


def _bench(**kw: Any) -> dict[str, Any]:
    config = {
        "model_type": "gemma3_text",
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
        "num_key_value_heads": 1,
        "sliding_window": 512,
        "sliding_window_pattern": 6,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
        "rope_scaling": None,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 32768,
        "vocab_size": 262144,
        "tie_word_embeddings": True,
    }
    config.update(kw)
    return config


# `lmx bench --config NAME` shapes: the published config.json files (270M: the bundled model's own);
# "tiny-*" is a small shape for smoke tests.
BENCH_CONFIGS: dict[str, dict[str, Any]] = {
    "gemma3-270m": _bench(hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4),
    "gemma3-1b": _bench(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4),
    "gemma3-4b": _bench(
        hidden_size=2560,
        intermediate_size=10240,
        num_hidden_layers=34,
        num_attention_heads=8,
        num_key_value_heads=4,
        sliding_window=1024,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
        vocab_size=262208,
    ),
    "tiny-gemma3": _bench(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=16,
        sliding_window_pattern=2,
        vocab_size=512,
    ),
}

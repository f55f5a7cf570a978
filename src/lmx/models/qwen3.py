"""Qwen 3 (dense): transformers' ``Qwen3ForCausalLM`` semantics on MLX."""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import mlx.nn as nn

from lmx.models.base import (
    AttentionLayer,
    BaseModelArgs,
    CausalLM,
    DecoderStack,
    Linear,
    OpsSlot,
    QKNormAttention,
    RMSNorm,
    layer_types_from,
    swiglu,
)
from lmx.models.rope import RoPE, rope_settings


@dataclasses.dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None
    max_position_embeddings: int = 32_768
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int | None = None
    layer_types: list | None = None
    hidden_act: str = "silu"

    def __post_init__(self) -> None:
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        first_sliding = self.max_window_layers if self.max_window_layers is not None else self.num_hidden_layers
        default = [
            "sliding_attention"
            if self.use_sliding_window and self.sliding_window and i >= first_sliding
            else "full_attention"
            for i in range(self.num_hidden_layers)
        ]
        self.layer_types = layer_types_from(self.layer_types, self.num_hidden_layers, default)


class Attention(QKNormAttention):
    def __init__(self, args: ModelArgs, layer_idx: int, ops: OpsSlot) -> None:
        super().__init__(ops)
        dim, self.n_heads, self.n_kv_heads = (
            args.hidden_size,
            args.num_attention_heads,
            args.num_key_value_heads,
        )
        self.head_dim = args.head_dim
        self.scale = self.head_dim**-0.5
        bias = args.attention_bias
        self.q_proj = Linear(dim, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, dim, bias=bias)
        # Qwen 3's addition over Qwen 2: RMSNorm on each head's queries and keys.
        self.q_norm = RMSNorm(self.head_dim, eps=args.rms_norm_eps, ops=ops)
        self.k_norm = RMSNorm(self.head_dim, eps=args.rms_norm_eps, ops=ops)
        layer_type = args.layer_types[layer_idx]
        settings = rope_settings(args.rope_parameters, args.rope_scaling, args.rope_theta, layer_type)
        self.rope = RoPE(self.head_dim, settings, args.max_position_embeddings, ops)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = Linear(dim, hidden, bias=False)
        self.up_proj = Linear(dim, hidden, bias=False)
        self.down_proj = Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(AttentionLayer):
    def __init__(self, args: ModelArgs, layer_idx: int, ops: OpsSlot) -> None:
        super().__init__()
        self.self_attn = Attention(args, layer_idx, ops)
        self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps, ops=ops)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps, ops=ops)

    def end(self, x: mx.array, out: mx.array) -> mx.array:
        """The layer after attention: the residual stream ``x`` plus attention ``out`` and the MLP."""
        h = x + self.self_attn.output(out, x.ndim)
        return h + self.mlp(self.post_attention_layernorm(h))


class TextModel(DecoderStack):
    def __init__(self, args: ModelArgs, ops: OpsSlot) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i, ops) for i in range(args.num_hidden_layers)]
        self.norm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps, ops=ops)


class Model(CausalLM):
    """Qwen 3 causal LM (the :class:`lmx.models.base.LanguageModel` contract)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__(args)
        self.model = TextModel(args, self.ops_slot)
        if not args.tie_word_embeddings:
            self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Drop buffers that are not parameters; a tied head is the embedding itself."""
        out = {k: v for k, v in weights.items() if "rotary_emb" not in k}
        if self.args.tie_word_embeddings:
            out.pop("lm_head.weight", None)
        return out

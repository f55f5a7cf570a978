"""Qwen 3 (dense): transformers' ``Qwen3ForCausalLM`` semantics on MLX."""

from __future__ import annotations

import dataclasses
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from lmx.io.gguf import GGUFArchitecture
from lmx.models.base import (
    AttentionLayer,
    BaseModelArgs,
    CausalLM,
    DecoderStack,
    GatedMLP,
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


class MLP(GatedMLP):
    def __init__(self, dim: int, hidden: int, ops: OpsSlot | None = None) -> None:
        super().__init__(ops)
        self.gate_proj = Linear(dim, hidden, bias=False)
        self.up_proj = Linear(dim, hidden, bias=False)
        self.down_proj = Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down(swiglu(*self.gate_up(x)))


class DecoderLayer(AttentionLayer):
    def __init__(self, args: ModelArgs, layer_idx: int, ops: OpsSlot) -> None:
        super().__init__()
        self.self_attn = Attention(args, layer_idx, ops)
        self.mlp = MLP(args.hidden_size, args.intermediate_size, ops)
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


# ---------------------------------------------------------------------------------------------------------------
# What the loading side reads of this architecture (lmx.loading, lmx.bench; through models/__init__.py).

HF_ARCHITECTURE = "Qwen3ForCausalLM"  # config.json "architectures" of a converted checkpoint

GGUF = GGUFArchitecture(
    name="qwen3",
    model_type="qwen3",
    layer_names={"ffn_norm": "post_attention_layernorm"},
    config=lambda metadata, config: {"hidden_act": "silu"},
)

# Used when a GGUF file carries no template.
CHAT_TEMPLATE = """{%- if tools -%}
  {{- '<|im_start|>system\\n' -}}
  {%- if messages and messages[0]['role'] == 'system' -%}{{- messages[0]['content'] + '\\n\\n' -}}{%- endif -%}
  {{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n'
      'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' -}}
  {%- for tool in tools -%}{{- '\\n' -}}{{- tool | tojson -}}{%- endfor -%}
  {{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within '
      '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, '
      '\"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' -}}
{%- elif messages and messages[0]['role'] == 'system' -%}
  {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' -}}
{%- endif -%}
{%- set ns = namespace(last_query=messages | length - 1, found=false) -%}
{%- for message in messages[::-1] -%}
  {%- if not ns.found and message['role'] == 'user' and message['content'] is string
        and not (message['content'].startswith('<tool_response>') and message['content'].endswith('</tool_response>')) -%}
    {%- set ns.found = true -%}
    {%- set ns.last_query = messages | length - 1 - loop.index0 -%}
  {%- endif -%}
{%- endfor -%}
{%- for message in messages -%}
  {%- set content = message['content'] if message['content'] is string else '' -%}
  {%- if message['role'] == 'user' or (message['role'] == 'system' and not loop.first) -%}
    {{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}
  {%- elif message['role'] == 'assistant' -%}
    {%- set reasoning = message.get('reasoning_content') or '' -%}
    {%- if not reasoning and '</think>' in content -%}
      {%- set reasoning = content.split('</think>')[0].split('<think>')[-1] -%}
      {%- set content = content.split('</think>')[-1] -%}
    {%- endif -%}
    {%- set content = content.lstrip('\\n') -%}
    {%- if loop.index0 > ns.last_query and (loop.last or reasoning) -%}
      {{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content -}}
    {%- else -%}
      {{- '<|im_start|>assistant\\n' + content -}}
    {%- endif -%}
    {%- for call in message.get('tool_calls') or [] -%}
      {%- set call = call['function'] if call['function'] is defined else call -%}
      {%- if content or not loop.first -%}{{- '\\n' -}}{%- endif -%}
      {{- '<tool_call>\\n{\"name\": \"' + call['name'] + '\", \"arguments\": ' -}}
      {%- if call['arguments'] is string -%}{{- call['arguments'] -}}{%- else -%}{{- call['arguments'] | tojson -}}{%- endif -%}
      {{- '}\\n</tool_call>' -}}
    {%- endfor -%}
    {{- '<|im_end|>\\n' -}}
  {%- elif message['role'] == 'tool' -%}
    {%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
    {{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' -}}
    {%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|im_start|>assistant\\n' -}}
  {%- if enable_thinking is defined and not enable_thinking -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}
{%- endif -%}
"""

# Turn terminators that end a chat reply, beyond the file's EOS (as generation_config.json lists).
EXTRA_EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")

NEUTRAL_NORM_WEIGHT = 1.0  # RMSNorm scales by weight: random bench weights are drawn around this


def _bench(hidden: int, inter: int, layers: int, heads: int, tied: bool, **kw: Any) -> dict[str, Any]:
    config = {
        "model_type": "qwen3",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "max_position_embeddings": 40960,
        "rope_theta": 1_000_000.0,
        "rope_scaling": None,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": tied,
    }
    config.update(kw)
    return config


# `lmx bench --config NAME` shapes: the published config.json files; "tiny-*" is a small shape for smoke tests.
BENCH_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": _bench(1024, 3072, 28, 16, True),
    "qwen3-1.7b": _bench(2048, 6144, 28, 16, True),
    "qwen3-4b": _bench(2560, 9728, 36, 32, True),
    "qwen3-8b": _bench(4096, 12288, 36, 32, False),
    "tiny-qwen3": _bench(64, 128, 3, 4, False, num_key_value_heads=2, head_dim=16, vocab_size=512),
}

"""Qwen 3 MoE: transformers' ``Qwen3MoeForCausalLM`` semantics on MLX.

Qwen 3's attention (q/k norms and all, :mod:`lmx.models.qwen3`) with a sparse MLP: a router picks
``num_experts_per_tok`` of ``num_experts`` SwiGLU experts per token (softmax over all experts, top-k,
renormalised when ``norm_topk_prob``) and the token's output is their weighted sum. Layers listed in
``mlp_only_layers``, or off the ``decoder_sparse_step`` beat, keep Qwen 3's dense MLP.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from lmx.errors import ConfigError, WeightsError
from lmx.io.gguf import GGUFArchitecture, meta, positive
from lmx.models import qwen3
from lmx.models.base import AttentionLayer, CausalLM, DecoderStack, Linear, OpsSlot, RMSNorm, layer_types_from, swiglu

# From this many (token, expert) pairs on, the pairs are sorted by expert before the gathered
# matmuls (see Experts): each expert's weights then serve a run of its tokens (a prefill chunk).
SORT_FROM = 64


@dataclasses.dataclass
class ModelArgs(qwen3.ModelArgs):
    num_experts: int | None = None
    num_local_experts: int | None = None  # what transformers 5 writes for num_experts
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list | None = None

    def __post_init__(self) -> None:
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        # transformers masks every layer with the window when use_sliding_window (no max_window_layers here)
        sliding = self.use_sliding_window and self.sliding_window
        default = ["sliding_attention" if sliding else "full_attention"] * self.num_hidden_layers
        self.layer_types = layer_types_from(self.layer_types, self.num_hidden_layers, default)
        self.num_experts = self.num_experts if self.num_experts is not None else self.num_local_experts
        if self.num_experts is None:
            raise ConfigError("config.json is missing the required key 'num_experts' (or 'num_local_experts')")
        for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config.json: {name!r} must be > 0, got {getattr(self, name)!r}")
        if self.num_experts_per_tok > self.num_experts:
            raise ConfigError(
                f"config.json: 'num_experts_per_tok' must be at most num_experts ({self.num_experts}), "
                f"got {self.num_experts_per_tok}"
            )
        self.mlp_only_layers = list(self.mlp_only_layers or [])
        bad = [i for i in self.mlp_only_layers if not isinstance(i, int) or not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ConfigError(
                f"config.json: 'mlp_only_layers' holds {bad}; allowed: layer indices 0..{self.num_hidden_layers - 1}"
            )

    def is_sparse(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` has the sparse MoE MLP (transformers' rule)."""
        return layer_idx not in self.mlp_only_layers and (layer_idx + 1) % self.decoder_sparse_step == 0


class Experts(nn.Module):
    """``num_experts`` SwiGLU MLPs as stacked weights (E, out, in), run by gathered matmuls.

    ``mx.gather_mm`` multiplies each (token, expert) pair by that expert's matrix without
    materialising per-token weight copies or looping over experts in Python. Measured on the CPU
    with MLX 0.32 and Qwen3-30B-A3B's shapes: with few (token, expert) pairs (a decode step) the
    expert matrix is the gathered left operand, ``W_e @ x`` (4 ms a projection; as the right
    operand, the transposed view ``W.swapaxes(-1, -2)`` is copied whole on every call: 174 ms);
    with many (a prefill chunk) the pairs are sorted by expert and ``x @ W_e.T`` runs on the
    sorted indices (several times faster than the left-operand form there). That gather_mm also
    computes only float32, so other weight dtypes are computed in float32: for fewer pairs than
    experts only the chosen experts' matrices are gathered and upcast, else the whole stack is
    upcast once for all the pairs.
    """

    def __init__(self, dim: int, hidden: int, n_experts: int) -> None:
        super().__init__()
        self.gate_proj = _Stacked(n_experts, hidden, dim)
        self.up_proj = _Stacked(n_experts, hidden, dim)
        self.down_proj = _Stacked(n_experts, dim, hidden)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """Each token's chosen experts' outputs: ``x`` (N, dim), ``indices`` (N, k) -> (N, k, dim)."""
        n, k = indices.shape
        dtype = x.dtype
        x = x.astype(mx.float32)
        if self.gate_proj["weight"].dtype != mx.float32 and indices.size < self.gate_proj["weight"].shape[0]:
            x = x[:, None, :, None]  # (N, 1, dim, 1)
            gate, up = self.gate_proj.chosen(indices) @ x, self.up_proj.chosen(indices) @ x  # (N, k, hidden, 1)
            out = self.down_proj.chosen(indices) @ swiglu(gate, up)  # (N, k, dim, 1)
            return out.reshape(n, k, -1).astype(dtype)  # (N, k, dim)
        if indices.size < SORT_FROM:
            x = x[:, None, :, None]  # (N, 1, dim, 1): broadcast against (N, k) indices
            gate = mx.gather_mm(self.gate_proj.float32(), x, lhs_indices=indices)  # (N, k, hidden, 1)
            up = mx.gather_mm(self.up_proj.float32(), x, lhs_indices=indices)
            out = mx.gather_mm(self.down_proj.float32(), swiglu(gate, up), lhs_indices=indices)  # (N, k, dim, 1)
            return out.reshape(n, k, -1).astype(dtype)  # (N, k, dim)
        flat = indices.flatten()
        order = mx.argsort(flat)
        x = x[order // k][:, None, :]  # (N * k, 1, dim), grouped by expert
        flat = flat[order]
        gate = mx.gather_mm(x, self.gate_proj.float32_t(), rhs_indices=flat, sorted_indices=True)  # (N * k, 1, hidden)
        up = mx.gather_mm(x, self.up_proj.float32_t(), rhs_indices=flat, sorted_indices=True)
        out = mx.gather_mm(swiglu(gate, up), self.down_proj.float32_t(), rhs_indices=flat, sorted_indices=True)
        out = out[mx.argsort(order)]  # (N * k, 1, dim), back in (token, slot) order
        return out.reshape(n, k, -1).astype(dtype)  # (N, k, dim)


class _Stacked(nn.Module):
    """One projection of every expert: ``weight`` (E, out, in), HF's per-expert ``weight`` stacked."""

    def __init__(self, n_experts: int, out_dims: int, in_dims: int) -> None:
        super().__init__()
        self.weight = mx.zeros((n_experts, out_dims, in_dims))

    def float32(self) -> mx.array:
        """(E, out, in) float32: the weight itself, or a float32 copy of another dtype (see Experts)."""
        return self["weight"].astype(mx.float32)

    def float32_t(self) -> mx.array:
        """(E, in, out) float32, the transpose of :meth:`float32`."""
        return self["weight"].swapaxes(-1, -2).astype(mx.float32)  # (E, in, out)

    def chosen(self, indices: mx.array) -> mx.array:
        """The (N, k) chosen experts' matrices, (N, k, out, in) float32."""
        return self["weight"][indices].astype(mx.float32)


class SparseMoeBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.norm_topk_prob = args.norm_topk_prob
        self.gate = Linear(args.hidden_size, args.num_experts, bias=False)  # the router
        self.experts = Experts(args.hidden_size, args.moe_intermediate_size, args.num_experts)

    def __call__(self, x: mx.array) -> mx.array:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, dim)
        # transformers takes the router softmax in float32 whatever the weights' dtype
        probs = mx.softmax(self.gate(x).astype(mx.float32), axis=-1, precise=True)  # (N, E)
        indices = mx.argpartition(-probs, kth=self.top_k - 1, axis=-1)[:, : self.top_k]  # (N, k), any order
        scores = mx.take_along_axis(probs, indices, axis=-1)
        if self.norm_topk_prob:
            scores = scores / scores.sum(axis=-1, keepdims=True)
        out = self.experts(x, indices)  # (N, k, dim)
        out = (out * scores.astype(out.dtype)[..., None]).sum(axis=1)
        return out.reshape(shape)


class DecoderLayer(AttentionLayer):
    def __init__(self, args: ModelArgs, layer_idx: int, ops: OpsSlot) -> None:
        super().__init__()
        self.self_attn = qwen3.Attention(args, layer_idx, ops)
        sparse = args.is_sparse(layer_idx)
        self.mlp = SparseMoeBlock(args) if sparse else qwen3.MLP(args.hidden_size, args.intermediate_size, ops)
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


_EXPERT = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


class Model(CausalLM):
    """Qwen 3 MoE causal LM (the :class:`lmx.models.base.LanguageModel` contract)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__(args)
        self.model = TextModel(args, self.ops_slot)
        if not args.tie_word_embeddings:
            self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Stack HF's per-expert matrices into (E, out, in) arrays; accept transformers' fused form too.

        Raises:
            WeightsError: a layer holds some experts' matrices but not all of them.
        """
        out: dict[str, mx.array] = {}
        experts: dict[tuple[str, str], dict[int, mx.array]] = {}
        for name, w in weights.items():
            if "rotary_emb" in name:
                continue
            if m := _EXPERT.fullmatch(name):
                experts.setdefault((m[1], m[3]), {})[int(m[2])] = w
            elif name.endswith("mlp.experts.gate_up_proj"):  # transformers' in-memory layout: (E, 2 * I, dim)
                gate, up = mx.split(w, 2, axis=1)
                out[f"{name[: -len('gate_up_proj')]}gate_proj.weight"] = gate
                out[f"{name[: -len('gate_up_proj')]}up_proj.weight"] = up
            elif name.endswith("mlp.experts.down_proj"):
                out[f"{name}.weight"] = w
            else:
                out[name] = w
        n = self.args.num_experts
        for (prefix, proj), by_index in experts.items():
            missing = [i for i in range(n) if i not in by_index]
            if missing or len(by_index) != n:
                raise WeightsError(
                    f"missing tensor(s): {', '.join(f'{prefix}.{i}.{proj}.weight' for i in missing) or '(none)'}"
                    f" ({prefix} has {len(by_index)} {proj} matrices for {n} experts)"
                )
            out[f"{prefix}.{proj}.weight"] = mx.stack([by_index[i] for i in range(n)])  # (E, out, in)
        if self.args.tie_word_embeddings:
            out.pop("lm_head.weight", None)
        return out


# ---------------------------------------------------------------------------------------------------------------
# What the loading side reads of this architecture (lmx.loading, lmx.bench; through models/__init__.py).

HF_ARCHITECTURE = "Qwen3MoeForCausalLM"  # config.json "architectures" of a converted checkpoint


def _gguf_config(metadata: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    return {
        "hidden_act": "silu",
        "num_experts": positive(metadata, "qwen3moe", "expert_count"),
        "num_experts_per_tok": positive(metadata, "qwen3moe", "expert_used_count"),
        "moe_intermediate_size": positive(metadata, "qwen3moe", "expert_feed_forward_length"),
        # llama.cpp's qwen3moe renormalises the top-k weights unless the file says otherwise
        "norm_topk_prob": meta(metadata, "qwen3moe", "expert_weights_norm", True) is True,
    }


# llama.cpp stores each layer's experts stacked, (E, out, in) as numpy reads them: the shape Experts keeps.
GGUF = GGUFArchitecture(
    name="qwen3moe",
    model_type="qwen3_moe",
    layer_names={
        "ffn_norm": "post_attention_layernorm",
        "ffn_gate_inp": "mlp.gate",
        "ffn_gate_exps": "mlp.experts.gate_proj",
        "ffn_up_exps": "mlp.experts.up_proj",
        "ffn_down_exps": "mlp.experts.down_proj",
    },
    config=_gguf_config,
)

CHAT_TEMPLATE = qwen3.CHAT_TEMPLATE  # the same tokenizer and chat format as dense Qwen 3
EXTRA_EOS_TOKENS = qwen3.EXTRA_EOS_TOKENS
NEUTRAL_NORM_WEIGHT = qwen3.NEUTRAL_NORM_WEIGHT

# `lmx bench --config NAME` shapes: the published config.json; "tiny-*" is a small shape for smoke tests.
MOE_BENCH_KEYS = {"model_type": "qwen3_moe", "norm_topk_prob": True}
BENCH_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen3-30b-a3b": {
        **qwen3.BENCH_CONFIGS["qwen3-8b"],
        **MOE_BENCH_KEYS,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_hidden_layers": 48,
        "num_key_value_heads": 4,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 768,
    },
    "tiny-qwen3-moe": {
        **qwen3.BENCH_CONFIGS["tiny-qwen3"],
        **MOE_BENCH_KEYS,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
    },
}

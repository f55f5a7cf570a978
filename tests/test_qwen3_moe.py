"""Qwen 3 MoE against transformers' Qwen3MoeForCausalLM on tiny random weights (2 layers, 4 experts, top-2)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import lmx  # isort: skip
import mlx.core as mx

from lmx.errors import ConfigError, WeightsError
from lmx.io import hf
from lmx.models import build_model, qwen3_moe
from test_models import load_tiny, ref_logits, rel_err

IDS = np.random.RandomState(0).randint(3, 300, size=(1, 40))  # 40 tokens x top-2 >= SORT_FROM: the sorted path
PROMPT = "Hello world! How are you"


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import save_tiny

    d = tmp_path_factory.mktemp("tiny-qwen3-moe")
    save_tiny("qwen3_moe", d)
    return d


@pytest.fixture(scope="module")
def reference(moe_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(moe_dir: Path) -> Iterator[lmx.Engine]:
    with lmx.load(moe_dir) as engine:
        yield engine


def test_router_spreads_tokens_over_experts(moe_dir):
    """The parity tests below only mean something if the random router uses every expert."""
    model = load_tiny(moe_dir)
    block = model.layers[0].mlp
    assert isinstance(block, qwen3_moe.SparseMoeBlock)
    h = model.embed(mx.array(IDS))[0]
    probs = mx.softmax(block.gate(h), axis=-1)
    top = np.argsort(-np.array(probs), axis=-1)[:, :2]
    assert set(np.unique(top)) == {0, 1, 2, 3}


def test_fp32_logits_match_reference(moe_dir, reference):
    model = load_tiny(moe_dir)
    ref = ref_logits(reference, IDS)
    assert rel_err(np.array(model(mx.array(IDS))), ref) < 1e-4
    # a few tokens (fewer pairs than SORT_FROM): the unsorted gathered path
    assert rel_err(np.array(model(mx.array(IDS[:, :5]))), ref_logits(reference, IDS[:, :5])) < 1e-4


def test_dense_and_sparse_layers_match_reference(tmp_path):
    """mlp_only_layers (and decoder_sparse_step) keep a dense MLP where transformers does."""
    from tiny_models import save_tiny

    reference = save_tiny("qwen3_moe", tmp_path, num_hidden_layers=3, mlp_only_layers=[0], norm_topk_prob=False)
    model = load_tiny(tmp_path)
    kinds = [type(layer.mlp).__name__ for layer in model.layers]
    assert kinds == ["MLP", "SparseMoeBlock", "SparseMoeBlock"]
    assert rel_err(np.array(model(mx.array(IDS))), ref_logits(reference, IDS)) < 1e-4


def test_bf16_logits_close_to_reference(moe_dir, reference):
    model = load_tiny(moe_dir, mx.bfloat16)
    ours = np.array(model(mx.array(IDS)).astype(mx.float32))
    # a copy: ref_logits casts the model to bfloat16 and back, which rounds its float32 weights
    ref = ref_logits(copy.deepcopy(reference), IDS, torch.bfloat16)
    assert rel_err(ours, ref) < 5e-2
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_cached_decode_equals_full_forward(moe_dir):
    model = load_tiny(moe_dir)
    full = np.array(model(mx.array(IDS)))
    cache = model.make_cache()
    steps = [np.array(model(mx.array(IDS[:, :3]), cache))]
    steps += [np.array(model(mx.array(IDS[:, t : t + 1]), cache)) for t in range(3, IDS.shape[1])]
    assert rel_err(np.concatenate(steps, axis=1), full) < 1e-5


def test_bf16_cached_decode_close_to_full_forward(moe_dir):
    """bfloat16 decode steps (2 pairs < 4 experts) take the chosen experts' matrices, prefill the whole stack."""
    model = load_tiny(moe_dir, mx.bfloat16)
    full = np.array(model(mx.array(IDS)).astype(mx.float32))
    cache = model.make_cache()
    steps = [np.array(model(mx.array(IDS[:, :3]), cache).astype(mx.float32))]
    steps += [np.array(model(mx.array(IDS[:, t : t + 1]), cache).astype(mx.float32)) for t in range(3, IDS.shape[1])]
    stepped = np.concatenate(steps, axis=1)
    assert rel_err(stepped, full) < 2e-2
    assert (stepped.argmax(-1) == full.argmax(-1)).mean() >= 0.9


def test_greedy_generate_equals_transformers(engine, reference):
    ids = engine.tokenizer.encode(PROMPT)
    eos = sorted(engine.tokenizer.eos_token_ids)
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=eos, pad_token_id=0
        )
    expected = out[0, len(ids) :].tolist()
    result = engine.generate(PROMPT, max_tokens=16)
    assert result.tokens == expected
    assert len(set(expected)) > 1  # not a degenerate repeat of one token


def test_batch_of_two_equals_each_alone(engine):
    prompts = [PROMPT, "def add(a, b):\n    return a + b and the quick brown fox"]
    alone = [engine.generate(p, max_tokens=12, logprobs=1) for p in prompts]
    batch = engine.batch_generate(prompts, max_tokens=12, logprobs=1)
    for b, a in zip(batch, alone):
        assert (b.tokens, b.finish_reason) == (a.tokens, a.finish_reason)
        np.testing.assert_allclose(b.logprobs, a.logprobs, atol=1e-4, rtol=0)


def test_sanitize_stacks_experts_and_accepts_the_fused_layout(moe_dir):
    weights = dict(hf.read_safetensors(hf.weight_files(moe_dir)))
    model = build_model(hf.read_json(moe_dir / "config.json"))
    stacked = model.sanitize(weights)
    gate = stacked["model.layers.0.mlp.experts.gate_proj.weight"]
    assert gate.shape == (4, 32, 64)
    assert np.array_equal(np.array(gate[2]), np.array(weights["model.layers.0.mlp.experts.2.gate_proj.weight"]))
    # transformers' in-memory names: gate_up_proj (E, 2 * I, dim) and down_proj (E, dim, I)
    fused = {k: v for k, v in weights.items() if ".mlp.experts." not in k}
    for i in range(2):
        prefix = f"model.layers.{i}.mlp.experts"
        fused[f"{prefix}.gate_up_proj"] = mx.concatenate(
            [stacked[f"{prefix}.gate_proj.weight"], stacked[f"{prefix}.up_proj.weight"]], axis=1
        )
        fused[f"{prefix}.down_proj"] = stacked[f"{prefix}.down_proj.weight"]
    again = model.sanitize(fused)
    assert sorted(again) == sorted(stacked)
    assert all(np.array_equal(np.array(again[k]), np.array(stacked[k])) for k in stacked)


def test_missing_expert_is_named(moe_dir):
    weights = dict(hf.read_safetensors(hf.weight_files(moe_dir)))
    del weights["model.layers.1.mlp.experts.3.up_proj.weight"]
    model = build_model(hf.read_json(moe_dir / "config.json"))
    with pytest.raises(WeightsError, match=r"model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight"):
        model.sanitize(weights)


def test_config_errors_are_typed():
    from tiny_models import qwen_moe_config

    base = {**qwen_moe_config(), "model_type": "qwen3_moe"}
    del base["num_experts"]
    with pytest.raises(ConfigError, match="'num_experts'"):
        build_model(base)
    with pytest.raises(ConfigError, match="'num_experts_per_tok' must be at most num_experts \\(4\\), got 5"):
        build_model({**base, "num_local_experts": 4, "num_experts_per_tok": 5})
    with pytest.raises(ConfigError, match="'mlp_only_layers' holds \\[7\\]"):
        build_model({**base, "num_experts": 4, "mlp_only_layers": [7]})


def write_moe_gguf(path: Path, reference: torch.nn.Module, tokens: list[str], merges: list[str]) -> None:
    """The reference's float32 weights as a llama.cpp-named qwen3moe GGUF (experts stacked (E, out, in))."""
    import gguf

    config = reference.config
    writer = gguf.GGUFWriter(str(path), "qwen3moe")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_expert_count(config.num_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    sd = {k: v.numpy() for k, v in reference.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    writer.add_tensor("output.weight", sd["lm_head.weight"])
    names = {
        "attn_norm": "input_layernorm.weight",
        "ffn_norm": "post_attention_layernorm.weight",
        "attn_q": "self_attn.q_proj.weight",
        "attn_k": "self_attn.k_proj.weight",
        "attn_v": "self_attn.v_proj.weight",
        "attn_output": "self_attn.o_proj.weight",
        "attn_q_norm": "self_attn.q_norm.weight",
        "attn_k_norm": "self_attn.k_norm.weight",
        "ffn_gate_inp": "mlp.gate.weight",
        "ffn_down_exps": "mlp.experts.down_proj",
    }
    for i in range(config.num_hidden_layers):
        for gguf_name, hf_name in names.items():
            writer.add_tensor(f"blk.{i}.{gguf_name}.weight", sd[f"model.layers.{i}.{hf_name}"])
        gate, up = np.split(sd[f"model.layers.{i}.mlp.experts.gate_up_proj"], 2, axis=1)
        writer.add_tensor(f"blk.{i}.ffn_gate_exps.weight", np.ascontiguousarray(gate))
        writer.add_tensor(f"blk.{i}.ffn_up_exps.weight", np.ascontiguousarray(up))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_loads_and_matches_reference(tmp_path):
    """The GGUF declaration (tensor names, expert metadata) against transformers on the same weights."""
    from conftest_gguf import byte_level_vocab
    from tiny_models import build_reference

    tokens, merges, _ = byte_level_vocab()
    reference = build_reference(
        "qwen3_moe", vocab_size=len(tokens), rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}
    )
    path = tmp_path / "tiny-moe.gguf"
    write_moe_gguf(path, reference, tokens, merges)
    ids = np.random.RandomState(1).randint(0, len(tokens), size=(1, 40))
    with lmx.load(path) as engine:
        assert engine.info().model_type == "qwen3_moe"
        ours = np.array(engine.model(mx.array(ids)))
    assert rel_err(ours, ref_logits(reference, ids)) < 1e-4

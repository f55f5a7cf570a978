"""Tiny random Gemma 3 / Qwen 3 / Qwen 3 MoE checkpoints built and saved with transformers (the reference)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB = 384
SPECIALS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Hello world! How are you today? I am fine, thank you.",
    "def add(a, b):\n    return a + b\n",
    "Numbers 12345 and 67890, dates like 2026-11-27.",
    "Cafe, naive, emoji 🙂 and CJK 你好世界 text.",
]

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def gemma_config(**overrides) -> dict:
    config = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        tie_word_embeddings=True,
    )
    config.update(overrides)
    return config


def qwen_config(**overrides) -> dict:
    config = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rope_parameters={
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 128,
            "rope_theta": 1000000.0,
        },
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    config.update(overrides)
    return config


def qwen_moe_config(**overrides) -> dict:
    """Qwen 3 MoE: 2 layers of 4 experts, top-2; one dense layer is set with mlp_only_layers=[...]."""
    config = qwen_config(
        num_hidden_layers=2,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=True,
    )
    config.update(overrides)
    return config


def build_reference(arch: str, **overrides) -> torch.nn.Module:
    """A transformers model with every parameter (norms too) random, in float32."""
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        Qwen3Config,
        Qwen3ForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    torch.manual_seed({"gemma3": 0, "qwen3": 1}.get(arch, 2))
    if arch == "gemma3":
        model = Gemma3ForCausalLM(Gemma3TextConfig(**gemma_config(**overrides)))
    elif arch == "qwen3_moe":
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**qwen_moe_config(**overrides)))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**qwen_config(**overrides)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.3 if "norm" in name else 0.08
            p.copy_(torch.randn_like(p) * std + (1.0 if "norm" in name and arch != "gemma3" else 0.0))
    return model.eval()


def train_tokenizer(specials: list[str] = SPECIALS) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 8,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok


def save_tiny(arch: str, out: Path, **overrides) -> torch.nn.Module:
    """Write a loadable HF directory (weights, config, tokenizer, chat template) to ``out``."""
    model = build_reference(arch, **overrides)
    model.save_pretrained(out)
    train_tokenizer().save(str(out / "tokenizer.json"))
    if arch == "gemma3":
        tok_config = {
            "bos_token": "<bos>",
            "eos_token": "<eos>",
            "pad_token": "<pad>",
            "add_bos_token": True,
            "chat_template": GEMMA_TEMPLATE,
        }
    else:
        tok_config = {
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<pad>",
            "add_bos_token": False,
            "chat_template": QWEN_TEMPLATE,
        }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config))
    return model


IMAGE_SPECIALS = ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]
# A chat template that renders image parts as <start_of_image> (as the published Gemma 3 ones do).
GEMMA_MM_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<start_of_image>{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=32,
    patch_size=4,
    vision_use_head=False,
)
IMAGE_TOKENS = 16  # 4 x 4 soft tokens pooled from the 8 x 8 patch grid
IMAGE_SIZE = 32


def save_tiny_multimodal(out: Path, tokenizer: Tokenizer | None = None, **text_overrides) -> torch.nn.Module:
    """A random ``Gemma3ForConditionalGeneration`` saved as an HF directory: weights, config,
    tokenizer (with the image tokens; ``tokenizer``: this one, which must hold them), chat
    template and preprocessor_config.json."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    tok = tokenizer or train_tokenizer(SPECIALS + IMAGE_SPECIALS)
    boi, eoi, soft = (tok.token_to_id(t) for t in IMAGE_SPECIALS)
    config = Gemma3Config(
        text_config=gemma_config(**text_overrides),
        vision_config=VISION,
        mm_tokens_per_image=IMAGE_TOKENS,
        boi_token_index=boi,
        eoi_token_index=eoi,
        image_token_index=soft,
    )
    torch.manual_seed(3)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.3 if "norm" in name else 0.08
            layer_norm = "layer_norm" in name or "post_layernorm" in name
            p.copy_(torch.randn_like(p) * std + (1.0 if layer_norm and name.endswith("weight") else 0.0))
    model.eval()
    model.save_pretrained(out)
    tok.save(str(out / "tokenizer.json"))
    tok_config = {
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "add_bos_token": True,
        "chat_template": GEMMA_MM_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config))
    preprocessor = {
        "image_processor_type": "Gemma3ImageProcessor",
        "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "rescale_factor": 1 / 255,
        "resample": 2,
        "do_pan_and_scan": None,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return model

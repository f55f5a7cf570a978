"""lmx convert SRC out.gguf: a GGUF file that loads back with the source's tokenization and logits.

References: the ``tokenizers`` library running each source's tokenizer.json, transformers running
the source checkpoint (and transformers' own GGUF reader for the tensor layout), and for the real
Gemma 3 270M its original GGUF file.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

import lmx  # isort: skip
import mlx.core as mx

from lmx.errors import InvalidOptionError, ModelNotFoundError, UnsupportedModelError
from lmx.io.gguf import read_header
from lmx.loading.convert import convert
from lmx.tokenizer.gguf import SPLIT_REGEXES

pytest_plugins = ["conftest_gguf"]

LMX = [sys.executable, "-m", "lmx.cli.main"]
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you today?",
    "Café crème, naïve façade, Ångström, Ελληνικά",
    "emoji 🙂🚀 and CJK 你好世界",
    "digits 1234567890 and 3.14159, 2026-11-27",
    "whitespace   runs\t\ttabs\n\n\nnewlines    end   ",
    "  leading spaces and trailing  ",
    "code: def add(a, b):\n    return a + b\n",
    "special <|im_start|>user\nhi<|im_end|> and <start_of_turn>model<end_of_turn> tokens <bos><eos>",
    "unicode e\u0301 (decomposed) vs é, Ω ≈ ∑, \u00a0nbsp",
    "",
    " ",
]
SPM_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>"]


def qwen_style(tok: Tokenizer) -> Tokenizer:
    """The tiny byte-level tokenizer with Qwen 3's own normalizer and pre-tokenizer (tokenizer.ggml.pre qwen2)."""
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_REGEXES["qwen2"]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False),
        ]
    )
    return tok


def gemma_style_tokenizer() -> Tokenizer:
    """A tiny SentencePiece-style BPE with byte fallback, laid out as Gemma 3's tokenizer.json is."""
    from tiny_models import CORPUS

    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = normalizers.Replace(" ", "▁")
    trainer_tok.train_from_iterator(
        CORPUS * 4, trainers.BpeTrainer(vocab_size=110, show_progress=False, initial_alphabet=[])
    )
    learned = json.loads(trainer_tok.to_str())["model"]
    tokens = [*SPM_SPECIALS, *(f"<0x{b:02X}>" for b in range(256))]
    for token, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        if token not in tokens:
            tokens.append(token)
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m) if not isinstance(m, str) else tuple(m.split(" ")) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPM_SPECIALS])
    return tok


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny Gemma 3 (SentencePiece-style vocabulary) and Qwen 3 (Qwen's pre-tokenizer) HF directories."""
    from tiny_models import VOCAB, save_tiny, train_tokenizer

    out = {}
    for arch in ("gemma3", "qwen3"):
        d = tmp_path_factory.mktemp(f"src-{arch}")
        save_tiny(arch, d)
        tok = gemma_style_tokenizer() if arch == "gemma3" else qwen_style(train_tokenizer())
        assert tok.get_vocab_size() <= VOCAB
        tok.save(str(d / "tokenizer.json"))
        if arch == "gemma3":
            config = json.loads((d / "tokenizer_config.json").read_text())
            config["unk_token"] = "<unk>"
            (d / "tokenizer_config.json").write_text(json.dumps(config))
        out[arch] = d
    return out


@pytest.fixture(scope="module")
def ggufs(sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out_dir = tmp_path_factory.mktemp("gguf")
    return {arch: convert(src, out_dir / f"{arch}.gguf") for arch, src in sources.items()}


@pytest.fixture(scope="module")
def pairs(sources: dict[str, Path], ggufs: dict[str, Path]) -> Iterator[dict[str, tuple[lmx.Engine, lmx.Engine]]]:
    out = {arch: (lmx.load(sources[arch]), lmx.load(ggufs[arch])) for arch in sources}
    yield out
    for a, b in out.values():
        a.close()
        b.close()


def _logits(engine: lmx.Engine, ids: list[int]) -> np.ndarray:
    return np.array(engine.model(mx.array([ids]))[0])


@pytest.mark.parametrize("arch", ["gemma3", "qwen3"])
def test_gguf_tokenizes_as_the_hf_tokenizer(arch, sources, pairs):
    reference = Tokenizer.from_file(str(sources[arch] / "tokenizer.json"))
    _, converted = pairs[arch]
    for text in TEXTS:
        want = reference.encode(text, add_special_tokens=False).ids
        assert converted.tokenizer.encode(text, add_special_tokens=False) == want, text
        assert converted.tokenizer.decode(want, skip_special_tokens=False) == reference.decode(
            want, skip_special_tokens=False
        ), text
    assert any(len(reference.encode(t).ids) > 3 for t in TEXTS)


@pytest.mark.parametrize("arch", ["gemma3", "qwen3"])
def test_gguf_special_tokens_and_template(arch, pairs, ggufs):
    source, converted = pairs[arch]
    a, b = source.tokenizer, converted.tokenizer
    assert (b.bos_token_id, b.pad_token_id, b.add_bos_token) == (a.bos_token_id, a.pad_token_id, a.add_bos_token)
    assert a.eos_token_ids <= b.eos_token_ids
    assert b.chat_template == a.chat_template and b.chat_template
    messages = [{"role": "user", "content": "Hi there"}]
    assert b.apply_chat_template(messages, add_generation_prompt=True) == a.apply_chat_template(
        messages, add_generation_prompt=True
    )
    md = read_header(ggufs[arch]).metadata
    if arch == "qwen3":
        assert (md["tokenizer.ggml.model"], md["tokenizer.ggml.pre"]) == ("gpt2", "qwen2")
        assert md["tokenizer.ggml.add_bos_token"] is False and md["tokenizer.ggml.merges"]
    else:
        assert md["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.merges" not in md
        assert len(md["tokenizer.ggml.scores"]) == len(md["tokenizer.ggml.tokens"])
        assert md["tokenizer.ggml.add_bos_token"] is True
    assert len(md["tokenizer.ggml.tokens"]) == 384  # padded to the embedding's rows, as llama.cpp needs


@pytest.mark.parametrize("arch", ["gemma3", "qwen3"])
def test_gguf_logits_and_greedy_tokens_equal_the_source(arch, pairs, references_for):
    source, converted = pairs[arch]
    ids = source.tokenizer.encode("Hello world! How are you today? Café 🙂 12345")
    got, want = _logits(converted, ids), _logits(source, ids)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    import torch

    with torch.no_grad():
        torch_logits = references_for(arch)(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(got, torch_logits, rtol=1e-3, atol=1e-3)
    assert converted.generate(ids, max_tokens=12).tokens == source.generate(ids, max_tokens=12).tokens


@pytest.fixture(scope="module")
def references_for(sources):
    import torch
    from transformers import AutoModelForCausalLM

    cache: dict = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = AutoModelForCausalLM.from_pretrained(sources[arch], dtype=torch.float32).eval()
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", ["gemma3", "qwen3"])
def test_gguf_layout_read_by_transformers(arch, ggufs, references_for):
    """transformers' GGUF reader (llama.cpp's conventions: names, Gemma's 1 + w norms) gives back the checkpoint."""
    import torch
    from transformers import AutoConfig

    from conftest_gguf import tf_tensors

    path = ggufs[arch]
    md = read_header(path).metadata
    assert md["general.architecture"] == arch
    for key in ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count"):
        assert f"{arch}.{key}" in md
    assert md[f"{arch}.attention.head_count_kv"] == 2 and md[f"{arch}.attention.key_length"] == 16
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    tensors = tf_tensors(path, config)
    state = references_for(arch).state_dict()
    compared = 0
    for name, value in tensors.items():
        if name in state:
            torch.testing.assert_close(
                value.float(), state[name].float(), rtol=0, atol=1e-6, msg=name
            )  # (w+1)-1 rounds
            compared += 1
    assert compared == len([n for n in state if n != "lm_head.weight" or arch == "qwen3"])


def test_gguf_to_gguf(ggufs, pairs, tmp_path):
    again = convert(ggufs["qwen3"], tmp_path / "again.gguf")
    first, second = read_header(ggufs["qwen3"]), read_header(again)
    assert {k: v for k, v in second.metadata.items() if k != "general.name"} == {
        k: v for k, v in first.metadata.items() if k != "general.name"
    }
    assert list(second.tensors) == list(first.tensors)
    source, _ = pairs["qwen3"]
    with lmx.load(again) as b:
        ids = source.tokenizer.encode(TEXTS[2])
        assert b.tokenizer.encode(TEXTS[2]) == ids
        np.testing.assert_allclose(_logits(b, ids), _logits(source, ids), rtol=1e-5, atol=1e-5)


def test_q8_0_and_half_gguf(sources, tmp_path):
    src = sources["qwen3"]
    q8 = convert(src, tmp_path / "q8.gguf", q_bits=8)
    half = convert(src, tmp_path / "f16.gguf", dtype="float16")
    bf16 = convert(src, tmp_path / "bf16.gguf", dtype="bfloat16")
    types = {
        p.name: {
            read_header(p).tensors["blk.0.attn_q.weight"].ggml_type,
            read_header(p).tensors["output.weight"].ggml_type,
        }
        for p in (q8, half, bf16)
    }
    assert types == {"q8.gguf": {8}, "f16.gguf": {1}, "bf16.gguf": {30}}  # GGML Q8_0, F16, BF16
    assert read_header(q8).tensors["blk.0.attn_norm.weight"].ggml_type == 0  # norms stay F32
    with lmx.load(src) as full:
        ids = full.tokenizer.encode("Hello world! How are you")
        ref = _logits(full, ids)
        for path in (q8, half, bf16):
            with lmx.load(path) as quant:
                got = _logits(quant, ids)
                assert np.abs(got - ref).max() / np.abs(ref).max() < 0.05, path.name
    assert q8.stat().st_size < half.stat().st_size


def test_cli_writes_a_gguf_file(sources, tmp_path):
    out = tmp_path / "out.gguf"
    done = subprocess.run([*LMX, "convert", str(sources["qwen3"]), str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert out.is_file() and out.read_bytes()[:4] == b"GGUF"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    again = subprocess.run([*LMX, "convert", str(sources["qwen3"]), str(out)], capture_output=True, text=True)
    assert again.returncode == 2 and "already exists" in again.stderr and str(out) in again.stderr
    q4 = subprocess.run(
        [*LMX, "convert", str(sources["qwen3"]), str(tmp_path / "q4.gguf"), "-q", "--q-bits", "4"],
        capture_output=True,
        text=True,
    )
    assert q4.returncode == 2 and "Q8_0" in q4.stderr and "4" in q4.stderr
    assert not (tmp_path / "q4.gguf").exists()


def test_gguf_output_errors(sources, tmp_path):
    src = sources["qwen3"]
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    with pytest.raises(InvalidOptionError, match="already exists") as e:
        convert(src, out)
    assert str(out) in str(e.value) and out.read_bytes() == b"old"
    convert(src, out, overwrite=True)
    assert out.read_bytes()[:4] == b"GGUF"
    with pytest.raises(InvalidOptionError, match=r"Q8_0.*q_bits=4"):
        convert(src, tmp_path / "q4.gguf", q_bits=4)
    with pytest.raises(InvalidOptionError, match="'int8'"):
        convert(src, tmp_path / "x.gguf", dtype="int8")
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        convert(tmp_path / "no-such-model", tmp_path / "y.gguf")
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(InvalidOptionError, match="is a directory"):
        convert(src, tmp_path / "dir.gguf", overwrite=True)
    quantized = convert(src, tmp_path / "mlx-q8", q_bits=8, q_group_size=32)
    with pytest.raises(UnsupportedModelError, match=r"lm_head\.biases.*only float"):
        convert(quantized, tmp_path / "z.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.gguf", "m.gguf", "mlx-q8"]


@pytest.mark.slow
def test_real_gemma_gguf_to_hf_and_back(gemma_gguf, tmp_path):
    hf = convert(gemma_gguf, tmp_path / "hf")
    back = convert(hf, tmp_path / "back.gguf")
    original_md, md = read_header(gemma_gguf).metadata, read_header(back).metadata
    for key in ("tokens", "token_type", "bos_token_id", "eos_token_id", "padding_token_id", "add_bos_token"):
        assert md[f"tokenizer.ggml.{key}"] == original_md[f"tokenizer.ggml.{key}"], key
    for key in (
        "context_length",
        "block_count",
        "attention.head_count_kv",
        "rope.freq_base",
        "attention.sliding_window",
    ):
        assert md[f"gemma3.{key}"] == original_md[f"gemma3.{key}"], key
    with lmx.load(gemma_gguf) as a, lmx.load(back) as b:
        for text in TEXTS:
            assert b.tokenizer.encode(text) == a.tokenizer.encode(text), text
        assert b.tokenizer.eos_token_ids == a.tokenizer.eos_token_ids
        ids = a.tokenizer.encode("The quick brown fox jumps over the lazy dog. 你好 🙂")
        np.testing.assert_allclose(_logits(b, ids), _logits(a, ids), rtol=1e-4, atol=1e-4)
        assert b.generate(ids, max_tokens=8).tokens == a.generate(ids, max_tokens=8).tokens


@pytest.mark.parametrize("arch", ["gemma3", "qwen3"])
def test_byte_level_gpt2_vocab_of_either_architecture(arch, tiny_dirs, tmp_path):
    """The shared tiny dirs use GPT-2's byte-level regex (tokenizer.ggml.pre gpt-2), Gemma's too."""
    out = convert(tiny_dirs[arch], tmp_path / "m.gguf")
    md = read_header(out).metadata
    assert (md["tokenizer.ggml.model"], md["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    reference = Tokenizer.from_file(str(tiny_dirs[arch] / "tokenizer.json"))
    with lmx.load(tiny_dirs[arch]) as a, lmx.load(out) as b:
        for text in TEXTS:
            want = reference.encode(text, add_special_tokens=False).ids
            assert b.tokenizer.encode(text, add_special_tokens=False) == want, text
        ids = a.tokenizer.encode(TEXTS[0])
        assert b.tokenizer.encode(TEXTS[0]) == ids
        np.testing.assert_allclose(_logits(b, ids), _logits(a, ids), rtol=1e-5, atol=1e-5)

"""Tests for lmx.tokenizer: parity with transformers, streaming detokenization, chat templates, loading.

Two tokenizers are trained here with the `tokenizers` library (nothing is downloaded): a
byte-level BPE like Qwen's and a SentencePiece-style BPE with byte fallback like Gemma's.
"""

from __future__ import annotations

import ast
import json
import random
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as Backend

import lmx.tokenizer
from lmx.errors import TokenizerError
from lmx.tokenizer import StreamingDetokenizer, Tokenizer, load_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "Numbers 12345 and 3.14159, dates 2024-05-01 and times 12:30.",
    "你好，世界。今天天气很好。我们去公园散步吧。",
    "Gemma and Qwen run on MLX. Tokenizers split text into pieces.",
    "    indented   text\twith\ttabs\n\n\nand several newlines",
    "café naïve résumé über straße",
    "Hello world! How are you today? I am fine, thanks.",
]

# Emoji, Korean, Japanese and some accents never occur in CORPUS, so they fall back to bytes.
TEXTS = [
    "Hello world",
    "  leading and trailing spaces  ",
    "multiple     spaces\tand\ttabs\n\n\nnewlines\r\n and   more",
    "emoji 😀👍🏽 and a flag 🇫🇷 and a family 👨‍👩‍👧 ok",
    "中文文本，日本語のテキスト、한국어 텍스트 mixed",
    "def f(x):\n    return x ** 2  # comment\n\n\nclass A: pass",
    "digits 1234567890 3.14 -42 1e10 0xFF",
    "<start_of_turn>user\nhi there<end_of_turn>\n<start_of_turn>model\n",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n<think>\nhm\n</think>\n\n",
    "mixed ünïcödé café naïve Ωμέγα ∑∫√",
    "",
    " ",
    "\n\n",
    "😀",
    "a😀b中c",
]

QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

GEMMA_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

QWEN_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

# Exercises the helpers transformers adds: strftime_now, tojson without HTML escaping,
# dict(), namespace(), loop controls and the {% generation %} block.
HELPERS_TEMPLATE = """{%- set ns = namespace(n=0) -%}
date={{ strftime_now('%Y-%m-%d') }}
{% for m in messages -%}
{%- if m.role == 'stop' %}{% break %}{% endif -%}
{%- set ns.n = ns.n + 1 -%}
{{ m.role }}{% if m.extra is defined %}+extra{% endif %}: {% generation %}{{ m.content }}{% endgeneration %}
{% endfor -%}
n={{ ns.n }} json={{ dict(a='<b>&', z='é') | tojson }} tools={{ tools | tojson }} extra={{ extra_var }} docs={{ documents is defined }}
{%- if add_generation_prompt %} GEN{% endif %}"""

QWEN_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather <b>now</b> & later, in °C",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}

QWEN_CHAT = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "What's the weather in Zürich?"},
    {
        "role": "assistant",
        "content": "",
        "reasoning": "Need the tool.",  # an alias: the template reads reasoning_content
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich <x>"}}}],
    },
    {"role": "tool", "content": '{"temp": 21, "sky": "😀"}'},
    {"role": "assistant", "content": "<think>\nlast thought\n</think>\n\nIt is 21 °C.", "tool_calls": None},
]

GEMMA_CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "  Hi there!  "},
    {"role": "assistant", "content": [{"type": "text", "text": "Hello 😀"}]},
    {"role": "user", "content": "中文?"},
]


def _merges(backend: Backend) -> list[tuple[str, str]]:
    raw = json.loads(backend.to_str())["model"]["merges"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in raw]


def _train_bytelevel() -> Backend:
    tok = Backend(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
    return tok


def _train_sentencepiece() -> Backend:
    """A Gemma-like tokenizer: Metaspace, BPE with byte fallback, Replace+ByteFallback+Fuse decoder."""
    pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    draft = Backend(models.BPE())
    draft.pre_tokenizer = pre
    draft.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=400, show_progress=False))
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for tok, _ in sorted(draft.get_vocab().items(), key=lambda kv: kv[1]):
        vocab.setdefault(tok, len(vocab))
    tok = Backend(models.BPE(vocab=vocab, merges=_merges(draft), unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tok.add_special_tokens([*specials, "<start_of_turn>", "<end_of_turn>"])
    return tok


def write_model_dir(path: Path, backend: Backend, tokenizer_config: dict[str, Any] | None, **files: Any) -> Path:
    """Write tokenizer.json, tokenizer_config.json and any extra files (dicts become JSON)."""
    path.mkdir(parents=True, exist_ok=True)
    backend.save(str(path / "tokenizer.json"))
    if tokenizer_config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    for name, content in files.items():
        text = content if isinstance(content, str) else json.dumps(content)
        (path / name.replace("__", ".")).write_text(text, encoding="utf-8")
    return path


BL_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": None,
    "eos_token": "<|im_end|>",
    "pad_token": "<|endoftext|>",
    "chat_template": QWEN_TEMPLATE,
}
SP_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "add_bos_token": True,
    "add_eos_token": False,
    "chat_template": GEMMA_TEMPLATE,
}


@pytest.fixture(scope="session")
def backends() -> dict[str, Backend]:
    return {"bl": _train_bytelevel(), "sp": _train_sentencepiece()}


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory, backends: dict[str, Backend]) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tok")
    return {
        "bl": write_model_dir(root / "qwen-like", backends["bl"], BL_CONFIG),
        "sp": write_model_dir(root / "gemma-like", backends["sp"], SP_CONFIG),
    }


@pytest.fixture(scope="session")
def toks(model_dirs: dict[str, Path]) -> dict[str, Tokenizer]:
    return {kind: load_tokenizer(path) for kind, path in model_dirs.items()}


def hf_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def stream(detok: StreamingDetokenizer, ids: list[int]) -> list[str]:
    return [detok.add_token(i) for i in ids] + [detok.finalize()]


# --- encode / decode parity -------------------------------------------------------------


def test_test_tokenizers_exercise_byte_paths(toks: dict[str, Tokenizer]) -> None:
    sp, bl = toks["sp"], toks["bl"]
    assert len(sp.byte_fallback_ids) == 256
    assert bl.byte_fallback_ids == frozenset()
    # The emoji is not in the SentencePiece vocabulary: 4 byte-fallback tokens.
    assert sp.encode("😀", add_special_tokens=False) == [sp.token_to_id(f"<0x{b:02X}>") for b in "😀".encode()]
    # In the byte-level vocabulary it is also split: one token per byte.
    assert len(bl.encode("😀")) == 4


@pytest.mark.parametrize("kind", ["bl", "sp"])
def test_encode_decode_match_transformers(kind: str, toks: dict[str, Tokenizer], model_dirs: dict[str, Path]) -> None:
    from transformers import PreTrainedTokenizerFast

    tok, hf = toks[kind], hf_tokenizer(model_dirs[kind])
    raw = PreTrainedTokenizerFast(tokenizer_file=str(model_dirs[kind] / "tokenizer.json"))
    for text in [*TEXTS, "".join(TEXTS)]:
        ids = tok.encode(text)
        assert ids == hf(text)["input_ids"], text
        plain = tok.encode(text, add_special_tokens=False)
        assert plain == hf(text, add_special_tokens=False)["input_ids"] == raw.encode(text, add_special_tokens=False)
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), text
        if "<" not in text:
            assert tok.decode(plain) == text


def test_special_tokens_in_text_and_bos(toks: dict[str, Tokenizer]) -> None:
    sp, bl = toks["sp"], toks["bl"]
    ids = sp.encode("<start_of_turn>user\nhi<end_of_turn>")
    assert ids[0] == sp.bos_token_id == sp.token_to_id("<bos>")
    assert ids[1] == sp.token_to_id("<start_of_turn>")
    assert ids[-1] == sp.token_to_id("<end_of_turn>")
    assert sp.decode(ids) == "user\nhi"
    assert sp.decode(ids, skip_special_tokens=False) == "<bos><start_of_turn>user\nhi<end_of_turn>"
    ids = bl.encode("<|im_start|>a<think>")
    assert bl.bos_token_id is None
    assert ids[0] == bl.token_to_id("<|im_start|>") and ids[-1] == bl.token_to_id("<think>")
    # <think> is an added token but not special, so decoding keeps it.
    assert bl.decode(ids) == "a<think>"


def test_vocab_and_id_lookup(toks: dict[str, Tokenizer], backends: dict[str, Backend]) -> None:
    sp = toks["sp"]
    assert sp.vocab_size == backends["sp"].get_vocab_size(with_added_tokens=True)
    assert sp.id_to_token(sp.token_to_id("<0x41>")) == "<0x41>"
    assert sp.id_to_token(sp.vocab_size + 5) is None and sp.id_to_token(-1) is None
    # ids in a model's padded embedding rows have no text; negative ids are errors
    assert sp.decode([sp.token_to_id("<0x41>"), sp.vocab_size + 5]) == "A"
    with pytest.raises(TokenizerError, match=">= 0"):
        sp.decode([-1])
    with pytest.raises(TokenizerError, match="must be a str"):
        sp.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(TokenizerError, match="lone surrogates"):
        sp.encode("a\ud800b")


# --- streaming detokenization ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bl", "sp"])
@pytest.mark.parametrize("skip", [True, False])
def test_streaming_equals_full_decode(kind: str, skip: bool, toks: dict[str, Tokenizer]) -> None:
    tok = toks[kind]
    for text in [*TEXTS, "".join(TEXTS), "   x    y     \n\n\n  z"]:
        ids = tok.encode(text)
        detok = tok.detokenizer(skip_special_tokens=skip)
        pieces = stream(detok, ids)
        full = tok.decode(ids, skip_special_tokens=skip)
        assert "".join(pieces) == full == detok.text, text
        assert detok.tokens == ids
        if "\ufffd" not in full:
            assert not any("\ufffd" in p for p in pieces), (text, pieces)


def test_streaming_holds_split_characters(toks: dict[str, Tokenizer]) -> None:
    bl, sp = toks["bl"], toks["sp"]
    # Byte-level: the emoji's 4 bytes are 4 tokens; nothing comes out until the last one.
    assert stream(bl.detokenizer(), bl.encode("😀")) == ["", "", "", "😀", ""]
    # Byte fallback: the run of byte tokens is held until it closes (next token or finalize).
    ids = sp.encode("a😀", add_special_tokens=False)
    pieces = stream(sp.detokenizer(), ids)
    assert pieces[0] == "a" and pieces[1:-1] == ["", "", "", ""] and pieces[-1] == "😀"
    ids = sp.encode("中a😀 b", add_special_tokens=False)
    pieces = stream(sp.detokenizer(), ids)
    assert "".join(pieces) == "中a😀 b" and "😀 b" in pieces and not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("kind", ["bl", "sp"])
def test_streaming_random_ids(kind: str, toks: dict[str, Tokenizer]) -> None:
    """The invariant holds for arbitrary id sequences, invalid UTF-8 and special tokens included."""
    tok = toks[kind]
    rng = random.Random(1234)
    pool = list(range(tok.vocab_size))
    bytes_heavy = sorted(tok.byte_fallback_ids) or [i for i in pool if len(tok.decode([i]).encode()) == 1]
    for trial in range(40):
        # Half the trials draw mostly byte tokens, so split and invalid characters are common.
        source = bytes_heavy if trial % 2 else pool
        ids = [rng.choice(source) if rng.random() < 0.8 else rng.choice(pool) for _ in range(rng.randint(1, 120))]
        for skip in (True, False):
            pieces = stream(tok.detokenizer(skip_special_tokens=skip), ids)
            assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip), ids


class _DecodeSpy:
    """Stands in for the backend and records how many ids each decode call gets."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.sizes: list[int] = []

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.sizes.append(len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("kind", ["bl", "sp"])
def test_streaming_decodes_a_bounded_window(kind: str, model_dirs: dict[str, Path]) -> None:
    tok = load_tokenizer(model_dirs[kind])
    ids = tok.encode("".join(TEXTS) * 20)
    assert len(ids) > 2000
    spy = _DecodeSpy(tok.backend)
    tok.backend = spy  # type: ignore[assignment]
    detok = tok.detokenizer()
    text = "".join(stream(detok, ids))
    tok.backend = spy.inner
    assert text == tok.decode(ids)
    # Context (the last emitted chunk) plus held ids: a byte run is held for at most 16 ids plus one character.
    assert max(spy.sizes) <= 2 * (16 + 4)
    assert sum(spy.sizes) <= 12 * len(ids)


def test_detokenizer_reset_and_options(toks: dict[str, Tokenizer]) -> None:
    sp = toks["sp"]
    detok = sp.detokenizer()
    detok.add_tokens(sp.encode("hello world"))
    detok.reset()
    assert detok.text == "" and detok.tokens == []
    assert "".join(stream(detok, sp.encode("again"))) == "again"
    with pytest.raises(TokenizerError, match="max_held_tokens"):
        StreamingDetokenizer(sp, max_held_tokens=2)
    assert detok.add_token(10**9) == ""
    with pytest.raises(TokenizerError, match=">= 0"):
        detok.add_token(-3)


# --- chat templates ------------------------------------------------------------------------


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_gemma_template_matches_transformers(
    add_generation_prompt: bool, toks: dict[str, Tokenizer], model_dirs: dict[str, Path]
) -> None:
    tok, hf = toks["sp"], hf_tokenizer(model_dirs["sp"])
    ours = tok.apply_chat_template(GEMMA_CHAT, add_generation_prompt=add_generation_prompt)
    theirs = hf.apply_chat_template(GEMMA_CHAT, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    assert ours.startswith("<bos><start_of_turn>user\nBe brief.\n\nHi there!<end_of_turn>\n")
    ids = tok.encode_chat(GEMMA_CHAT, add_generation_prompt=add_generation_prompt)
    assert ids == hf.apply_chat_template(
        GEMMA_CHAT, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt
    )
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id  # the template's BOS only, not two


@pytest.mark.parametrize("thinking", [None, True, False])
@pytest.mark.parametrize("with_tools", [False, True])
def test_qwen_template_matches_transformers(
    thinking: bool | None, with_tools: bool, toks: dict[str, Tokenizer], model_dirs: dict[str, Path]
) -> None:
    tok, hf = toks["bl"], hf_tokenizer(model_dirs["bl"])
    kwargs: dict[str, Any] = {} if thinking is None else {"enable_thinking": thinking}
    tools = [QWEN_TOOL] if with_tools else None
    ours = tok.apply_chat_template(QWEN_CHAT, tools=tools, **kwargs)
    theirs = hf.apply_chat_template(QWEN_CHAT, tools=tools, tokenize=False, add_generation_prompt=True, **kwargs)
    assert ours == theirs
    assert ours.endswith("<|im_start|>assistant\n" + ("<think>\n\n</think>\n\n" if thinking is False else ""))
    assert "<think>\nNeed the tool.\n</think>" in ours  # the aliased reasoning reached the template
    assert "<think>\nlast thought\n</think>\n\nIt is 21 °C." in ours
    if with_tools:
        assert '"Weather <b>now</b> & later, in °C"' in ours  # tojson without HTML escaping
    assert tok.encode_chat(QWEN_CHAT, tools=tools, **kwargs) == hf.apply_chat_template(
        QWEN_CHAT, tools=tools, tokenize=True, return_dict=False, add_generation_prompt=True, **kwargs
    )


def test_template_helpers_match_transformers(toks: dict[str, Tokenizer], model_dirs: dict[str, Path]) -> None:
    tok, hf = toks["bl"], hf_tokenizer(model_dirs["bl"])
    chat = [
        {"role": "user", "content": "a", "extra": None},  # keys holding None are dropped
        {"role": "assistant", "content": "b"},
        {"role": "stop", "content": "x"},
    ]
    args: dict[str, Any] = {"tools": [{"name": "t", "d": "<é>"}], "extra_var": 7}
    ours = tok.apply_chat_template(chat, chat_template=HELPERS_TEMPLATE, **args)
    theirs = hf.apply_chat_template(
        chat, chat_template=HELPERS_TEMPLATE, tokenize=False, add_generation_prompt=True, **args
    )
    assert ours == theirs
    assert f"date={datetime.now():%Y-%m-%d}" in ours
    assert (
        "user: aassistant: bn=2" in ours and 'json={"a": "<b>&", "z": "é"}' in ours and "extra=7 docs=True GEN" in ours
    )


def test_template_errors(toks: dict[str, Tokenizer], backends: dict[str, Backend]) -> None:
    sp = toks["sp"]
    with pytest.raises(TokenizerError, match="roles must alternate"):
        sp.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(TokenizerError, match="syntax error"):
        sp.apply_chat_template([{"role": "user", "content": "a"}], chat_template="{% if %}")
    with pytest.raises(TokenizerError, match="underscore"):
        sp.apply_chat_template(
            [{"role": "user", "content": "a"}], chat_template="{% set ns = namespace() %}{% set ns._x = 1 %}"
        )
    bare = Tokenizer(backends["bl"], name="my-model")
    with pytest.raises(TokenizerError, match=r"my-model.*no chat template.*chat_template"):
        bare.apply_chat_template([{"role": "user", "content": "a"}])
    assert (
        bare.apply_chat_template([{"role": "user", "content": "a"}], chat_template="{{ messages[0].content }}") == "a"
    )


@pytest.mark.parametrize(
    "messages",
    [
        "hello",
        [],
        [["user", "hi"]],
        [{"content": "no role"}],
        [{"role": "", "content": "empty role"}],
        [{"role": "user", "content": 5}],
        [{"role": "user"}],
        {"role": "user", "content": "a dict, not a list"},
    ],
)
def test_bad_messages(messages: Any, toks: dict[str, Tokenizer]) -> None:
    with pytest.raises(TokenizerError, match="messages"):
        toks["bl"].apply_chat_template(messages)


def test_messages_without_content_need_tool_calls(toks: dict[str, Tokenizer]) -> None:
    call = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": None, "tool_calls": [call]}]
    assert '<tool_call>\n{"name": "f", "arguments": {}}' in toks["bl"].apply_chat_template(chat)
    with pytest.raises(TokenizerError, match="tools"):
        toks["bl"].apply_chat_template(chat, tools="not a list")  # type: ignore[arg-type]


def test_chat_template_file_and_named_templates(tmp_path: Path, backends: dict[str, Backend]) -> None:
    config = {
        **BL_CONFIG,
        "chat_template": [
            {"name": "default", "template": "config:{{ messages[0].content }}"},
            {"name": "tool_use", "template": "tools:{{ tools | length }}"},
        ],
    }
    named = load_tokenizer(write_model_dir(tmp_path / "named", backends["bl"], config))
    msgs = [{"role": "user", "content": "x"}]
    assert named.apply_chat_template(msgs) == "config:x"
    assert named.apply_chat_template(msgs, tools=[QWEN_TOOL]) == "tools:1"
    assert named.apply_chat_template(msgs, chat_template="tool_use", tools=[]) == "tools:0"

    file_dir = write_model_dir(
        tmp_path / "file",
        backends["bl"],
        {**BL_CONFIG, "chat_template": "config"},
        chat_template__jinja="file:{{ eos_token }}",
    )
    tok = load_tokenizer(file_dir)
    assert tok.chat_template == "file:{{ eos_token }}"
    assert (
        tok.apply_chat_template(msgs)
        == "file:<|im_end|>"
        == hf_tokenizer(file_dir).apply_chat_template(msgs, tokenize=False)
    )

    only_file = write_model_dir(tmp_path / "only", backends["bl"], None, chat_template__jinja="only-file")
    (only_file / "additional_chat_templates").mkdir()
    (only_file / "additional_chat_templates" / "tool_use.jinja").write_text("extra-tools")
    tok = load_tokenizer(only_file)
    assert tok.apply_chat_template(msgs) == "only-file"
    assert tok.apply_chat_template(msgs, tools=[]) == "extra-tools"

    legacy = write_model_dir(tmp_path / "legacy", backends["bl"], None, chat_template__json={"chat_template": "legacy"})
    assert load_tokenizer(legacy).chat_template == "legacy"


# --- loading --------------------------------------------------------------------------------


def test_eos_union(tmp_path: Path, backends: dict[str, Backend]) -> None:
    path = write_model_dir(tmp_path / "m", backends["sp"], SP_CONFIG)
    tok = load_tokenizer(path, config={"eos_token_id": 5}, generation_config={"eos_token_id": [1, 7]})
    eos = tok.token_to_id("<eos>")
    assert eos == 1
    assert tok.eos_token_ids == frozenset({eos, 5, 7})
    assert tok.eos_token == "<eos>"
    # Read from the directory when not passed; text_config of multimodal configs counts too.
    (path / "config.json").write_text(json.dumps({"eos_token_id": [6], "text_config": {"eos_token_id": 9}}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 8}))
    assert load_tokenizer(path).eos_token_ids == frozenset({eos, 6, 8, 9})
    assert load_tokenizer(path, config={}, generation_config={}).eos_token_ids == frozenset({eos})
    end_of_turn = tok.token_to_id("<end_of_turn>")
    built = Tokenizer(backends["sp"], eos_tokens=[end_of_turn, "<eos>"])
    assert built.eos_token_ids == frozenset({end_of_turn, eos}) and built.eos_token == "<eos>"
    with pytest.raises(TokenizerError, match="not in its vocabulary"):
        Tokenizer(backends["sp"], eos_tokens=["<nope>"])
    with pytest.raises(Exception, match="eos_token_id"):
        load_tokenizer(path, config={"eos_token_id": "1"})


@pytest.mark.parametrize("flag", [True, False, None])
def test_add_bos_token_honoured(flag: bool | None, tmp_path: Path, backends: dict[str, Backend]) -> None:
    from transformers import PreTrainedTokenizerFast

    config = {k: v for k, v in SP_CONFIG.items() if k != "add_bos_token"}
    if flag is not None:
        config["add_bos_token"] = flag
    path = write_model_dir(tmp_path / "m", backends["sp"], config)
    tok = load_tokenizer(path)
    ids = tok.encode("hello")
    # None: detected from the post-processor, which prepends <bos>.
    assert tok.add_bos_token is (flag is not False)
    assert (ids[0] == tok.bos_token_id) is (flag is not False)
    assert tok.encode("hello", add_special_tokens=False) == (ids if flag is False else ids[1:])
    # transformers honours an explicit add_bos_token (AutoTokenizer 5.24 ignores add_bos_token=false
    # from tokenizer_config.json when tokenizer.json's post-processor adds BOS, so compare with the kwarg).
    kwargs = {} if flag is None else {"add_bos_token": flag}
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), bos_token="<bos>", **kwargs)
    assert ids == hf("hello")["input_ids"]


def test_add_bos_token_on_a_backend_without_bos(backends: dict[str, Backend]) -> None:
    bl = backends["bl"]
    plain = Tokenizer(bl, bos_token="<|endoftext|>")
    assert plain.add_bos_token is False and plain.encode("hi")[0] != plain.bos_token_id
    forced = Tokenizer(bl, bos_token="<|endoftext|>", add_bos_token=True)
    assert forced.encode("hi") == [bl.token_to_id("<|endoftext|>"), *plain.encode("hi")]
    with pytest.raises(TokenizerError, match="no bos_token"):
        Tokenizer(bl, add_bos_token=True)


def test_special_token_dicts_and_special_tokens_map(tmp_path: Path, backends: dict[str, Backend]) -> None:
    config = {"bos_token": {"__type": "AddedToken", "content": "<bos>", "lstrip": False}, "add_bos_token": True}
    path = write_model_dir(
        tmp_path / "m",
        backends["sp"],
        config,
        special_tokens_map__json={"eos_token": {"content": "<eos>"}, "pad_token": "<pad>"},
    )
    tok = load_tokenizer(path)
    assert tok.bos_token == "<bos>" and tok.bos_token_id == 2
    assert tok.eos_token_ids == frozenset({1}) and tok.pad_token_id == 0
    assert tok.special_tokens_map == {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}


def test_missing_and_malformed_files(tmp_path: Path, backends: dict[str, Backend]) -> None:
    with pytest.raises(TokenizerError, match=r"tokenizer\.json not found"):
        load_tokenizer(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    with pytest.raises(TokenizerError, match=r"bad/tokenizer\.json is not a valid tokenizers file"):
        load_tokenizer(bad)
    (bad / "tokenizer.json").write_text('{"version": "1.0"}')
    with pytest.raises(TokenizerError, match=r"tokenizer\.json"):
        load_tokenizer(bad)
    path = write_model_dir(tmp_path / "cfg", backends["bl"], None)
    (path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json is not valid JSON"):
        load_tokenizer(path)
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": 3}))
    with pytest.raises(TokenizerError, match="chat_template"):
        load_tokenizer(path)
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<not-there>"}))
    with pytest.raises(TokenizerError, match="not in its vocabulary"):
        load_tokenizer(path)


def test_package_does_not_import_mlx() -> None:
    package_dir = Path(lmx.tokenizer.__file__).parent
    for source in package_dir.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n == "mlx" or n.startswith("mlx.") for n in names), (source, names)

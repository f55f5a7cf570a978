"""Hostile training lines (issue 21, item 7): a line nested 100,000 deep is a DatasetError
naming the file and line; a huge line is cut before it is tokenized, keeping the same tokens."""

from __future__ import annotations

import lmx  # noqa: F401  # isort: skip

import json
from pathlib import Path
from typing import Any

import pytest

from lmx.tokenizer import Tokenizer, load_tokenizer
from lmx.train.data import DatasetError, char_budget, load_jsonl


@pytest.fixture(scope="module")
def tok(tiny_dirs: dict[str, Path]) -> Tokenizer:
    return load_tokenizer(tiny_dirs["qwen3"])


class LengthRecorder(Tokenizer):
    """The real tokenizer, recording the longest text it was asked to encode or render."""

    longest = 0

    def encode(self, text: str, *args: Any, **kwargs: Any) -> list[int]:
        self.longest = max(self.longest, len(text))
        return super().encode(text, *args, **kwargs)

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        self.longest = max(self.longest, *(len(m["content"]) for m in messages))
        return super().apply_chat_template(messages, **kwargs)


def recorder(tok: Tokenizer) -> LengthRecorder:
    out = LengthRecorder.__new__(LengthRecorder)
    out.__dict__.update(tok.__dict__)
    return out


@pytest.mark.parametrize("opener", ["[", '{"a":'])
def test_deeply_nested_line_names_file_and_line(tok: Tokenizer, tmp_path: Path, opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    path = tmp_path / "deep.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + opener * 100_000 + closer * 100_000 + "\n")
    with pytest.raises(DatasetError, match=rf"{path}:2: the JSON is nested too deeply"):
        load_jsonl(path, tok)


RECORDS = {
    "text": lambda big: {"text": big},
    "long prompt": lambda big: {"prompt": big, "completion": "done"},
    "long completion": lambda big: {"prompt": "Q:", "completion": big},
    "long user turn": lambda big: {
        "messages": [{"role": "user", "content": big}, {"role": "assistant", "content": "ok"}]
    },
    "long assistant turn": lambda big: {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": big}]
    },
}
# every record with the prompt learned and masked; a text record has no prompt to mask
HUGE_CASES = [
    pytest.param(RECORDS[name], mask, id=f"{name}-{'masked' if mask else 'unmasked'}")
    for name in RECORDS
    for mask in (False, True)
    if not (mask and name == "text")
]


@pytest.mark.parametrize(("record", "mask_prompt"), HUGE_CASES)
def test_huge_line_is_cut_before_tokenizing(tok: Tokenizer, tmp_path: Path, record: Any, mask_prompt: bool) -> None:
    big = "lorem ipsum dolor sit amet, " * 10_000  # 280 kB; tokenizing 100 MB in full peaked at 15 GB
    rec = record(big)
    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    spy = recorder(tok)
    got = examples(path, spy, max_seq_len=32, mask_prompt=mask_prompt)
    assert spy.longest < char_budget(tok, 32) + 1000 < len(big)  # a template adds its markup
    full = examples(path, tok, max_seq_len=None, mask_prompt=mask_prompt)  # tokenized in full, then cut here
    assert not isinstance(full, str)
    want = [(t[:32], m[:32]) for t, m in full if any(m[:32])]
    assert got == (want or "no example has a token to learn")


def examples(path: Path, tok: Tokenizer, **kwargs: Any) -> list[tuple[Any, Any]] | str:
    try:
        return [(list(e.tokens), list(e.targets)) for e in load_jsonl(path, tok, **kwargs).examples]
    except DatasetError as e:
        return "no example has a token to learn" if "no example has a token to learn" in str(e) else str(e)

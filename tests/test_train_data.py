"""Training data: JSONL formats, prompt masking, errors naming file and line, batching."""

from __future__ import annotations

import lmx  # noqa: F401  # isort: skip

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from lmx.loading import load_model
from lmx.tokenizer import load_tokenizer
from lmx.train.data import DatasetError, collate, epoch_batches, eval_batches, load_jsonl, load_split
from lmx.train.losses import loss_sum


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizers(tiny_dirs):
    return {arch: load_tokenizer(d) for arch, d in tiny_dirs.items()}


def _targets_text(tok, example) -> str:
    return tok.decode([int(t) for t, m in zip(example.tokens, example.targets) if m], skip_special_tokens=False)


def test_text_records_end_with_eos_and_train_every_token(tokenizers, tmp_path):
    tok = tokenizers["gemma3"]
    ds = load_jsonl(_write(tmp_path / "t.jsonl", [{"text": "Hello world!"}, "", {"text": "The quick fox"}]), tok)
    assert ds.format == "text" and len(ds) == 2  # the blank line is skipped
    first = ds.examples[0]
    assert list(first.tokens) == [*tok.encode("Hello world!"), 1]  # BOS ... EOS (<eos> = 1)
    assert first.tokens[0] == tok.bos_token_id
    assert list(first.targets) == [False] + [True] * (len(first) - 1)


@pytest.mark.parametrize("mask_prompt", [False, True])
def test_completion_records_mask_the_prompt(tokenizers, tmp_path, mask_prompt):
    tok = tokenizers["gemma3"]
    path = _write(tmp_path / "c.jsonl", [{"prompt": "How are you?", "completion": " I am fine."}])
    ex = load_jsonl(path, tok, mask_prompt=mask_prompt).examples[0]
    prompt = tok.encode("How are you?")
    assert list(ex.tokens) == prompt + tok.encode(" I am fine.", add_special_tokens=False) + [1]
    if mask_prompt:
        assert _targets_text(tok, ex) == " I am fine.<eos>"
        assert not any(ex.targets[: len(prompt)])
    else:
        assert ex.targets[1:].all()


@pytest.mark.parametrize("arch", ["gemma3", "qwen3"])
def test_chat_records_with_mask_prompt_train_only_assistant_turns(tokenizers, tmp_path, arch):
    tok = tokenizers[arch]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi there"},
        {"role": "user", "content": "How are you?"},
        {"role": "assistant", "content": "I am fine"},
    ]
    path = _write(tmp_path / "chat.jsonl", [{"messages": messages}])
    full = load_jsonl(path, tok).examples[0]
    assert list(full.tokens) == tok.encode_chat(messages, add_generation_prompt=False)
    assert full.targets[1:].all()
    masked = load_jsonl(path, tok, mask_prompt=True).examples[0]
    end = "<end_of_turn>\n" if arch == "gemma3" else "<|im_end|>\n"
    assert _targets_text(tok, masked) == f"Hi there{end}I am fine{end}"


def test_truncation_and_examples_left_without_targets(tokenizers, tmp_path):
    tok = tokenizers["gemma3"]
    rows = [{"prompt": "a long prompt " * 10, "completion": " done"}, {"prompt": "short", "completion": " ok"}]
    ds = load_jsonl(_write(tmp_path / "c.jsonl", rows), tok, mask_prompt=True, max_seq_len=8)
    assert len(ds) == 1  # the first lost every completion token to truncation
    assert all(len(e) <= 8 for e in ds.examples)
    with pytest.raises(DatasetError, match="no example has a token to learn"):
        load_jsonl(_write(tmp_path / "d.jsonl", rows[:1]), tok, mask_prompt=True, max_seq_len=8)


@pytest.mark.parametrize(
    ("rows", "kwargs", "message"),
    [
        ([{"text": "ok"}, {"text": "ok"}, "{not json"], {}, r"bad\.jsonl:3: not valid JSON"),
        ([{"text": "ok"}, "[1, 2]"], {}, r"bad\.jsonl:2: each line must be a JSON object, got list"),
        ([{"txt": "x"}], {}, r"bad\.jsonl:1: a record needs 'text'.*got keys \['txt'\]"),
        ([{"text": "a"}, {"prompt": "p", "completion": "c"}], {}, r"bad\.jsonl:2: a 'completion' record in a file"),
        ([{"text": 5}], {}, r"bad\.jsonl:1: 'text' must be a non-empty string, got 5"),
        ([{"prompt": "p", "completion": None}], {}, r"bad\.jsonl:1: 'completion' must be a string"),
        ([{"prompt": "p", "completion": ""}], {}, r"bad\.jsonl:1: 'completion' is empty"),
        ([{"messages": [{"role": "user"}]}], {}, r"bad\.jsonl:1: messages\[0\]\['content'\] must be a string"),
        ([{"messages": "hi"}], {}, r"bad\.jsonl:1: 'messages' must be a non-empty list"),
        (
            [{"messages": [{"role": "user", "content": "hi"}]}],
            {"mask_prompt": True},
            r"bad\.jsonl:1: with mask_prompt a conversation needs an assistant message",
        ),
        ([{"text": "a"}], {"mask_prompt": True}, r"bad\.jsonl:1: mask_prompt needs prompt/completion or messages"),
        ([""], {}, r"bad\.jsonl holds no records"),
    ],
)
def test_bad_records_name_file_and_line(tokenizers, tmp_path, rows, kwargs, message):
    with pytest.raises(DatasetError, match=message):
        load_jsonl(_write(tmp_path / "bad.jsonl", rows), tokenizers["gemma3"], **kwargs)


def test_missing_data_is_a_clear_error(tokenizers, tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_jsonl(tmp_path / "none.jsonl", tokenizers["gemma3"])
    with pytest.raises(DatasetError, match="give a directory with train.jsonl"):
        load_split(tmp_path / "nowhere", "train", tokenizers["gemma3"])
    _write(tmp_path / "train.jsonl", [{"text": "x"}])
    assert load_split(tmp_path, "valid", tokenizers["gemma3"]) is None
    assert len(load_split(tmp_path, "train", tokenizers["gemma3"])) == 1
    assert DatasetError.__mro__[1].__module__ == "lmx.errors" and issubclass(DatasetError, ValueError)


def test_epoch_batches_are_a_deterministic_function_of_seed_and_epoch(tokenizers, tmp_path):
    rows = [{"text": "word " * (i % 7 + 1)} for i in range(23)]
    ds = load_jsonl(_write(tmp_path / "t.jsonl", rows), tokenizers["qwen3"])
    e0 = epoch_batches(ds, 4, epoch=0, seed=1)
    assert e0 == epoch_batches(ds, 4, epoch=0, seed=1)
    assert len(e0) == 5 and all(len(b) == 4 for b in e0)  # 23 // 4 full batches
    assert len({i for b in e0 for i in b}) == 20
    assert any(epoch_batches(ds, 4, epoch=e, seed=1) != e0 for e in (1, 2, 3))
    assert any(epoch_batches(ds, 4, epoch=0, seed=s) != e0 for s in (2, 3, 4))
    assert sorted(i for b in eval_batches(ds, 4) for i in b) == list(range(23))
    with pytest.raises(DatasetError, match="fewer than batch_size=24"):
        epoch_batches(ds, 24, 0, 0)


def test_collate_pads_right_with_zero_weight(tokenizers, tmp_path):
    ds = load_jsonl(_write(tmp_path / "t.jsonl", [{"text": "a b c d e f"}, {"text": "a"}]), tokenizers["gemma3"])
    batch = collate(ds.examples, pad_id=0)
    long, short = len(ds.examples[0]), len(ds.examples[1])
    assert batch.inputs.shape == batch.targets.shape == batch.weights.shape == (2, long - 1)
    assert batch.num_tokens == long + short
    np.testing.assert_array_equal(np.array(batch.weights[1]), [1] * (short - 1) + [0] * (long - short))
    np.testing.assert_array_equal(np.array(batch.targets[0]), ds.examples[0].tokens[1:])


def test_mask_prompt_loss_ignores_prompt_targets(tiny_dirs, tmp_path):
    loaded = load_model(tiny_dirs["gemma3"])
    rows = [{"prompt": "What is the capital of France?", "completion": " Paris."}]
    path = _write(tmp_path / "c.jsonl", rows)

    def losses(mask_prompt: bool) -> tuple[float, float]:
        batch = collate(load_jsonl(path, loaded.tokenizer, mask_prompt=mask_prompt).examples)
        weights = np.array(batch.weights)
        changed = np.array(batch.targets)
        changed[weights == 0] = (changed[weights == 0] + 17) % 384  # other ids where nothing is scored
        if mask_prompt:
            assert (weights == 0).sum() >= 5
        else:
            changed[0, 2] = (changed[0, 2] + 17) % 384  # a prompt token, scored without masking
        a, _ = loss_sum(loaded.model, batch.inputs, batch.targets, batch.weights)
        b, _ = loss_sum(loaded.model, batch.inputs, mx.array(changed), batch.weights)
        return a.item(), b.item()

    a, b = losses(True)
    assert a == b
    a, b = losses(False)
    assert a != b

"""lmx.classify: label scores equal plain forward passes; batching, padding and prefix sharing change nothing."""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import logging
from pathlib import Path

import lmx  # isort: skip
import mlx.core as mx
import numpy as np
import pytest

from lmx.classify import Classification, build_messages, classify, default_instruction
from lmx.cli import classify as cli_classify
from lmx.errors import ContextLengthError, EngineClosedError, InvalidOptionError

INSTRUCTION = "Which words come next?"
LABELS = ["the quick", "the lazy", "dog", "fox jumps"]  # the first two share their first token
TEXTS = [
    "Hello world! How are you today?",
    "def add(a, b):\n    return a + b\n" * 3,
    "x",
    "Numbers 12345 and 67890, dates like 2026-11-27. The quick brown fox jumps over the lazy dog. " * 2,
    "Cafe, naive, emoji 🙂 and CJK 你好世界 text.",
]
# What the tiny models' chat templates write around a user turn, and the token ending an answer.
TEMPLATE = {
    "gemma3": ("<bos><start_of_turn>user\n{}<end_of_turn>\n<start_of_turn>model\n", "<end_of_turn>"),
    "qwen3": ("<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>"),
}


def prompt_ids(engine: lmx.Engine, arch: str, turns: list[tuple[str, str | None]]) -> list[int]:
    """Token ids of a chat written out by hand: (user text, assistant answer or None for the last)."""
    template, end = TEMPLATE[arch]
    user, model_head = template.split("{}")
    text = ""
    for i, (content, answer) in enumerate(turns):
        text += (user if i == 0 else user.replace("<bos>", "")) + content
        text += model_head + (answer + end + "\n" if answer is not None else "")
    return engine.tokenizer.encode(text, add_special_tokens=False)


def answer_ids(engine: lmx.Engine, arch: str, label: str) -> list[int]:
    return engine.tokenizer.encode(label, add_special_tokens=False) + [engine.tokenizer.token_to_id(TEMPLATE[arch][1])]


def reference_logprobs(engine: lmx.Engine, ids: list[int], answers: list[list[int]]) -> np.ndarray:
    """log P(answer | ids) for each answer, from plain full forward passes (no padding: one
    batch of rows per answer length)."""
    model, out = engine.model, np.zeros(len(answers))
    for n in sorted({len(a) for a in answers}):
        which = [i for i, a in enumerate(answers) if len(a) == n]
        full = mx.array([ids + answers[i] for i in which])  # (rows, L)
        if model.args.vocab_size > 1000:  # a real vocabulary: the LM head only where it is needed
            logits = model.head(model.hidden(full, model.make_cache())[:, len(ids) - 1 :])
        else:
            logits = model(full)[:, len(ids) - 1 :]  # (rows, n, V)
        # The log-softmax in float64: over a 262,144-token vocabulary a float32 logsumexp is off by
        # up to ~1e-3 (MLX's on the CPU), more than the tolerance of the real-model test.
        logits = np.array(logits.astype(mx.float32), dtype=np.float64)
        top = logits.max(axis=-1, keepdims=True)
        logprobs = logits - (top + np.log(np.exp(logits - top).sum(axis=-1, keepdims=True)))
        for row, i in enumerate(which):
            out[i] = sum(float(logprobs[row, k, t]) for k, t in enumerate(answers[i]))
    return out


def as_array(results: list[Classification], labels: list[str]) -> np.ndarray:
    return np.array([[r.logprobs[label] for label in labels] for r in results])


def test_scores_equal_plain_forward_passes(engines: dict[str, lmx.Engine], arch: str) -> None:
    engine = engines[arch]
    results = classify(engine, TEXTS, LABELS, instruction=INSTRUCTION, batch_size=2)
    answers = [answer_ids(engine, arch, label) for label in LABELS]
    for text, result in zip(TEXTS, results):
        ids = prompt_ids(engine, arch, [(f"{INSTRUCTION}\n\nText:\n{text}", None)])
        expected = reference_logprobs(engine, ids, answers)
        got = np.array([result.logprobs[label] for label in LABELS])
        np.testing.assert_allclose(got, expected, atol=5e-5, rtol=0)
        probs = np.exp(expected - expected.max())
        probs /= probs.sum()
        np.testing.assert_allclose([result.scores[label] for label in LABELS], probs, atol=1e-5, rtol=0)
        assert sum(result.scores.values()) == pytest.approx(1.0, abs=1e-9)
        assert result.label == LABELS[int(np.argmax(expected))]
        assert not result.truncated


def test_labels_sharing_their_first_token_get_different_scores(engines: dict[str, lmx.Engine], arch: str) -> None:
    engine = engines[arch]
    first = [engine.tokenizer.encode(label, add_special_tokens=False) for label in ("the quick", "the lazy")]
    assert first[0][0] == first[1][0] and first[0] != first[1]
    for result in classify(engine, TEXTS, LABELS, instruction=INSTRUCTION):
        assert abs(result.logprobs["the quick"] - result.logprobs["the lazy"]) > 1e-3
    # A label that is a prefix of another is told apart by the end of the answer.
    (result,) = classify(engine, [TEXTS[0]], ["the", "the quick"], instruction=INSTRUCTION)
    ids = prompt_ids(engine, arch, [(f"{INSTRUCTION}\n\nText:\n{TEXTS[0]}", None)])
    expected = reference_logprobs(engine, ids, [answer_ids(engine, arch, "the"), answer_ids(engine, arch, "the quick")])
    np.testing.assert_allclose([result.logprobs["the"], result.logprobs["the quick"]], expected, atol=5e-5, rtol=0)


def test_batch_size_and_padding_side_change_nothing(
    engines: dict[str, lmx.Engine], arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = engines[arch]
    alone = [classify(engine, [text], LABELS, instruction=INSTRUCTION)[0] for text in TEXTS]
    base = as_array(alone, LABELS)
    for batch_size, side in [(len(TEXTS), "right"), (len(TEXTS), "left"), (2, "left"), (3, "right")]:
        results = classify(engine, TEXTS, LABELS, instruction=INSTRUCTION, batch_size=batch_size, padding_side=side)
        np.testing.assert_allclose(as_array(results, LABELS), base, atol=2e-5, rtol=0, err_msg=f"{batch_size} {side}")
        assert [r.label for r in results] == [r.label for r in alone]
    # Nor do prompt chunks (the engine's prefill_step_size), batches cut by length, or
    # stage 2 one branch and one text per pass, nor LM-head blocks of 3 rows.
    step = engine.prefill_step_size
    try:
        engine.prefill_step_size = 3
        with monkeypatch.context() as m:
            module, score = importlib.import_module("lmx.classify"), importlib.import_module("lmx.classify_score")
            m.setattr(score, "BRANCH_TOKENS", 1)  # one branch per pass
            m.setattr(score, "STAGE2_SCORES", 1)  # one text per pass
            m.setattr(score, "HEAD_ROWS", 3)
            m.setattr(module, "_BATCH_POSITIONS", 100)  # long texts go alone, short ones in pairs
            results = classify(engine, TEXTS, LABELS, instruction=INSTRUCTION, batch_size=2)
    finally:
        engine.prefill_step_size = step
    np.testing.assert_allclose(as_array(results, LABELS), base, atol=2e-5, rtol=0)
    # A text's result does not depend on the other texts in its batch.
    shuffled = [TEXTS[i] for i in (3, 0, 4, 2, 1)]
    again = as_array(classify(engine, shuffled, LABELS, instruction=INSTRUCTION, batch_size=5), LABELS)
    np.testing.assert_allclose(again, base[[3, 0, 4, 2, 1]], atol=2e-5, rtol=0)


MANY_WORDS = [
    "the",
    "quick",
    "lazy",
    "dog",
    "fox",
    "jumps",
    "over",
    "brown",
    "red",
    "blue",
    "cat",
    "bird",
    "fish",
    "tree",
    "sun",
    "moon",
    "star",
    "rain",
    "wind",
    "snow",
]


def test_many_labels_equal_plain_per_label_computation(
    engines: dict[str, lmx.Engine], arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """300 labels of 1-3 words, many sharing leading tokens or being a prefix of another
    (stage 2 runs them as a trie of label prefixes), against log P(answer) summed token by
    token from one plain forward pass per label; with the default limits and with limits
    that cut stage 2 and the LM head into many passes."""
    engine = engines[arch]
    pairs = [f"{a} {b}" for a in MANY_WORDS for b in MANY_WORDS if a != b]
    labels = MANY_WORDS + pairs[:260] + [f"{p} {w}" for p, w in zip(pairs[:40:2], MANY_WORDS)]
    assert len(labels) == 300 == len(set(labels))
    texts = [TEXTS[0], TEXTS[3], TEXTS[2]]
    expected = np.zeros((len(texts), len(labels)))
    for i, text in enumerate(texts):
        ids = prompt_ids(engine, arch, [(f"{INSTRUCTION}\n\nText:\n{text}", None)])
        for j, label in enumerate(labels):  # the straightforward way: one forward pass per label, no sharing
            answer = answer_ids(engine, arch, label)
            logits = engine.model(mx.array([ids + answer]))[0, len(ids) - 1 :].astype(mx.float32)  # (n, V)
            logits = np.array(logits, dtype=np.float64)
            top = logits.max(axis=-1, keepdims=True)
            logprobs = logits - (top + np.log(np.exp(logits - top).sum(axis=-1, keepdims=True)))
            expected[i, j] = sum(logprobs[k, t] for k, t in enumerate(answer))
    results = classify(engine, texts, labels, instruction=INSTRUCTION, batch_size=2)
    np.testing.assert_allclose(as_array(results, labels), expected, atol=5e-5, rtol=0)
    assert [r.label for r in results] == [labels[j] for j in expected.argmax(axis=1)]
    score = importlib.import_module("lmx.classify_score")
    monkeypatch.setattr(score, "BRANCH_TOKENS", 7)  # passes not aligned with the branches' lengths
    monkeypatch.setattr(score, "STAGE2_SCORES", 2000)
    monkeypatch.setattr(score, "HEAD_ROWS", 37)
    results = classify(engine, texts, labels, instruction=INSTRUCTION, batch_size=2, padding_side="left")
    np.testing.assert_allclose(as_array(results, labels), expected, atol=5e-5, rtol=0)


def test_examples_become_earlier_turns(engines: dict[str, lmx.Engine], arch: str) -> None:
    engine = engines[arch]
    examples = [("The quick brown fox", "fox jumps"), {"text": "a lazy dog", "label": "dog"}]
    labels = ["fox jumps", "dog"]
    results = classify(engine, TEXTS[:2], labels, examples=examples)
    head = default_instruction(labels)
    answers = [answer_ids(engine, arch, label) for label in labels]
    for text, result in zip(TEXTS[:2], results):
        turns = [
            (f"{head}\n\nText:\nThe quick brown fox", "fox jumps"),
            (f"{head}\n\nText:\na lazy dog", "dog"),
            (f"{head}\n\nText:\n{text}", None),
        ]
        expected = reference_logprobs(engine, prompt_ids(engine, arch, turns), answers)
        np.testing.assert_allclose([result.logprobs[label] for label in labels], expected, atol=5e-5, rtol=0)
    assert build_messages("t", labels, examples=examples)[1] == {"role": "assistant", "content": "fox jumps"}


def test_text_longer_than_the_context_is_cut_with_a_warning(
    engines: dict[str, lmx.Engine], caplog: pytest.LogCaptureFixture
) -> None:
    arch, engine = "gemma3", engines["gemma3"]
    long_text = "The quick brown fox jumps over the lazy dog. " * 80
    assert len(engine.tokenizer.encode(long_text)) > engine.context_length
    with caplog.at_level(logging.WARNING, logger="lmx.classify"):
        short, cut = classify(engine, [TEXTS[0], long_text], LABELS, instruction=INSTRUCTION)
    assert not short.truncated and cut.truncated
    assert any("did not fit the context length" in r.getMessage() and "[1]" in r.getMessage() for r in caplog.records)
    # The prompt keeps its head and the template's end of turn, and just fits with the longest answer.
    template, _ = TEMPLATE[arch]
    head, tail = template.format(f"{INSTRUCTION}\n\nText:\n\x00").split("\x00")
    encode = engine.tokenizer.encode
    answers = [answer_ids(engine, arch, label) for label in LABELS]
    head_ids, tail_ids = encode(head, add_special_tokens=False), encode(tail, add_special_tokens=False)
    keep = engine.context_length - max(map(len, answers)) + 1 - len(head_ids) - len(tail_ids)
    ids = head_ids + encode(long_text, add_special_tokens=False)[:keep] + tail_ids
    expected = reference_logprobs(engine, ids, answers)
    np.testing.assert_allclose([cut.logprobs[label] for label in LABELS], expected, atol=5e-5, rtol=0)


def test_max_text_tokens_cuts_texts_without_a_warning(
    engines: dict[str, lmx.Engine], caplog: pytest.LogCaptureFixture
) -> None:
    arch, engine = "qwen3", engines["qwen3"]
    with caplog.at_level(logging.WARNING, logger="lmx.classify"):
        short, cut = classify(engine, ["x", TEXTS[3]], LABELS, instruction=INSTRUCTION, max_text_tokens=5)
    assert not short.truncated and cut.truncated and not caplog.records
    template, _ = TEMPLATE[arch]
    head, tail = template.format(f"{INSTRUCTION}\n\nText:\n\x00").split("\x00")
    encode = engine.tokenizer.encode
    ids = encode(head, add_special_tokens=False) + encode(TEXTS[3])[:5] + encode(tail, add_special_tokens=False)
    expected = reference_logprobs(engine, ids, [answer_ids(engine, arch, label) for label in LABELS])
    np.testing.assert_allclose([cut.logprobs[label] for label in LABELS], expected, atol=5e-5, rtol=0)


def test_an_instruction_that_fills_the_context_is_an_error(engines: dict[str, lmx.Engine]) -> None:
    with pytest.raises(ContextLengthError, match="the instruction and examples alone take"):
        classify(engines["gemma3"], ["hi"], LABELS, instruction="The quick brown fox jumps. " * 200)


@pytest.mark.parametrize(
    ("texts", "labels", "kwargs", "message"),
    [
        (["hi"], [], {}, "labels is empty"),
        (["hi"], ["a", "b", "a"], {}, r"labels\[2\] 'a' duplicates labels\[0\]"),
        (["hi"], ["a", " "], {}, r"labels\[1\] is empty"),
        (["hi"], "ab", {}, "labels must be a list of strings, got str"),
        (["hi"], ["a", 3], {}, r"labels\[1\] must be a string, got int"),
        (["hi", ""], ["a"], {}, r"texts\[1\] is empty"),
        (["hi", "  \n"], ["a"], {}, r"texts\[1\] is empty"),
        ("hi", ["a"], {}, "texts must be a list of strings, got str"),
        ([None], ["a"], {}, r"texts\[0\] must be a string, got NoneType"),
        (["hi"], ["a"], {"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        (["hi"], ["a"], {"max_text_tokens": -1}, "max_text_tokens must be an integer >= 1, got -1"),
        (["hi"], ["a"], {"padding_side": "middle"}, "padding_side must be 'right' or 'left', got 'middle'"),
        (["hi"], ["a"], {"examples": [("t", "z")]}, r"examples\[0\] has the label 'z', which is not one of \['a'\]"),
        (["hi"], ["a"], {"examples": [("t",)]}, r"examples\[0\] must be a \(text, label\) pair"),
        (["hi"], ["a"], {"instruction": 3}, "instruction must be a string or None, got int"),
    ],
)
def test_bad_arguments_raise_typed_errors(
    engines: dict[str, lmx.Engine], texts: object, labels: object, kwargs: dict, message: str
) -> None:
    with pytest.raises(InvalidOptionError, match=message):
        classify(engines["qwen3"], texts, labels, **kwargs)  # type: ignore[arg-type]


def test_no_texts_give_no_results(engines: dict[str, lmx.Engine]) -> None:
    assert classify(engines["qwen3"], [], ["a", "b"]) == []


def test_classify_runs_between_the_steps_of_open_streams(engines: dict[str, lmx.Engine]) -> None:
    engine = engines["qwen3"]
    expected = engine.generate("Hello", max_tokens=40).tokens
    alone = classify(engine, ["hi"], ["a", "b"])
    stream = engine.stream("Hello", max_tokens=40)
    next(stream)  # a generation is running
    assert classify(engine, ["hi"], ["a", "b"]) == alone  # from this thread too: no deadlock
    rest = [t.id for t in stream]
    assert [expected[0], *rest] == expected  # the stream went on unchanged
    assert engine.metrics.prompt_tokens > 0


def test_closed_engine(tiny_dirs: dict[str, Path]) -> None:
    engine = lmx.load(tiny_dirs["qwen3"])
    engine.close()
    with pytest.raises(EngineClosedError):
        classify(engine, ["hi"], ["a", "b"])


@pytest.mark.slow
def test_real_model_scores_equal_plain_forward_passes() -> None:
    engine = lmx.load()
    labels = ["technical", "creative", "ethical", "casual"]
    texts = [
        "The kernel scheduler keeps runnable tasks in a red-black tree keyed by virtual runtime.",
        "\n\nlol yeah i'm just chilling at home, wanna grab pizza later?",  # "\n\n" merges into the prompt's "\n"
    ]
    with engine:
        results = classify(engine, texts, labels, batch_size=2)
        tok = engine.tokenizer
        end = tok.token_to_id("<end_of_turn>")
        answers = [tok.encode(label, add_special_tokens=False) + [end] for label in labels]
        for text, result in zip(texts, results):
            content = f"{default_instruction(labels)}\n\nText:\n{text}"
            prompt = f"<bos><start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n"
            ids = tok.encode(prompt, add_special_tokens=False)
            expected = reference_logprobs(engine, ids, answers)
            # Each answer token's float32 logsumexp over 262,144 logits is off by ~1e-4 (lmx's CPU
            # kernel; MLX's own by ~1e-3), against the float64 reference: 2 tokens per answer.
            np.testing.assert_allclose([result.logprobs[label] for label in labels], expected, atol=4e-4, rtol=0)


# --------------------------------------------------------------------------- CLI
def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lmx")
    cli_classify.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["classify", *argv])
    return args.func(args)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


CLI_LABELS = ["dog", "fox jumps", "the lazy"]


def test_cli_jsonl_with_text_field_writes_results(
    tiny_dirs: dict[str, Path], engines: dict[str, lmx.Engine], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "results.jsonl"
    records = [{"id": "a", "body": TEXTS[0]}, {"id": 7, "body": TEXTS[1], "other": 1}, {"body": TEXTS[2]}]
    src.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    argv = ["--model", str(tiny_dirs["qwen3"]), "--labels", ",".join(CLI_LABELS), "--input", str(src)]
    assert run_cli([*argv, "--text-field", "body", "--output", str(out), "--batch-size", "2"]) == 0
    lines = read_jsonl(out)
    assert [line["id"] for line in lines] == ["a", 7, 3]  # the id field, else the line number
    expected = classify(engines["qwen3"], [r["body"] for r in records], CLI_LABELS)
    for line, result in zip(lines, expected):
        assert line["label"] == result.label and list(line["scores"]) == CLI_LABELS
        np.testing.assert_allclose(list(line["scores"].values()), list(result.scores.values()), atol=1e-5)
    err = capsys.readouterr().err
    assert "100%" in err and "3/3" in err  # the progress bar
    assert "classified 3 texts in" in err and "texts/s" in err and "skipped 0" in err


def test_cli_csv_and_txt_ids_are_row_and_line_numbers(
    tiny_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    model = ["--model", str(tiny_dirs["gemma3"]), "--labels", ",".join(CLI_LABELS), "--no-progress"]
    csv_in = tmp_path / "in.csv"
    with csv_in.open("w", newline="", encoding="utf-8-sig") as f:  # as spreadsheets write it, with a BOM
        writer = csv.writer(f)
        writer.writerow(["title", "body"])
        writer.writerows([["one", TEXTS[0]], ["two", "multi\nline, with comma"]])
    assert run_cli([*model, "--input", str(csv_in), "--text-field", "body"]) == 0  # results to stdout
    assert [r["id"] for r in map(json.loads, capsys.readouterr().out.splitlines())] == [1, 2]
    txt_in, out = tmp_path / "in.txt", tmp_path / "out.jsonl"
    txt_in.write_text(f"{TEXTS[0]}\n{TEXTS[2]}\n\n{TEXTS[4]}\n")
    assert run_cli([*model, "--input", str(txt_in), "--output", str(out)]) == 0
    assert [r["id"] for r in read_jsonl(out)] == [1, 2, 4]


def test_cli_resumes_skipping_ids_already_in_the_output(
    tiny_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "results.jsonl"
    argv = ["--model", str(tiny_dirs["qwen3"]), "--labels", ",".join(CLI_LABELS), "--input", str(src)]
    argv += ["--output", str(out), "--no-progress"]
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:2]))
    run_cli(argv)
    first = out.read_text()
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out.write_text(first + '{"id": 3, "label": "do')  # an interrupted write
    capsys.readouterr()
    run_cli(argv)
    err = capsys.readouterr().err
    assert "dropping an incomplete last line" in err and "classified 3 texts" in err and "skipped 2" in err
    text = out.read_text()
    assert text.startswith(first)
    assert [r["id"] for r in read_jsonl(out)] == [1, 2, 3, 4, 5]
    run_cli(argv)  # nothing left to do
    assert out.read_text() == text and "classified 0 texts" in capsys.readouterr().err


def test_cli_input_errors_are_typed_and_come_before_loading(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    no_model = ["--model", str(tmp_path / "missing-model"), "--labels", "a,b", "--input", str(src)]
    src.write_text(json.dumps({"id": 1, "body": "x", "title": "t"}) + "\n")
    with pytest.raises(InvalidOptionError, match=r"line 1 has no field 'text'; its fields: \['body', 'id', 'title'\]"):
        run_cli(no_model)
    src.write_text(json.dumps({"text": "x"}) + "\n" + json.dumps({"text": " "}) + "\n")
    with pytest.raises(InvalidOptionError, match=r"line 2 \(id 2\) has an empty text"):
        run_cli(no_model)
    src.write_text(json.dumps({"id": "k", "text": "x"}) + "\n" + json.dumps({"id": "k", "text": "y"}) + "\n")
    with pytest.raises(InvalidOptionError, match="line 2 repeats the id 'k' of line 1"):
        run_cli(no_model)
    src.write_text("[1, 2]\n")
    with pytest.raises(InvalidOptionError, match="line 1 must be a JSON object, got list"):
        run_cli(no_model)
    src.write_text(json.dumps({"text": "x"}) + "\n")
    out.write_text(json.dumps({"id": 1, "label": "b", "scores": {"b": 0.5, "c": 0.5}}) + "\n")
    with pytest.raises(InvalidOptionError, match=r"holds results for the labels \['b', 'c'\], not \['a', 'b'\]"):
        run_cli([*no_model, "--output", str(out)])
    csv_in = tmp_path / "in.csv"
    csv_in.write_text("title,body\nt,x\n")
    with pytest.raises(InvalidOptionError, match=r"has no column 'text'; its columns: \['title', 'body'\]"):
        run_cli([*no_model[:-1], str(csv_in)])
    txt_in = tmp_path / "in.txt"
    txt_in.write_text("x\n")
    with pytest.raises(InvalidOptionError, match="--text-field does not apply"):
        run_cli([*no_model[:-1], str(txt_in), "--text-field", "body"])
    with pytest.raises(InvalidOptionError, match=r"must end in one of .jsonl, .ndjson, .csv, .txt, got '.tsv'"):
        run_cli([*no_model[:-1], str(tmp_path / "in.tsv")])
    with pytest.raises(InvalidOptionError, match="--batch-size must be >= 1, got 0"):
        run_cli([*no_model[:-1], str(txt_in), "--batch-size", "0"])
    with pytest.raises(InvalidOptionError, match=r"labels\[1\] 'a' duplicates labels\[0\]"):
        run_cli([*no_model[:3], "a, a", "--input", str(txt_in)])

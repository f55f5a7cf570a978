"""Constrained decoding on the tiny models: the spec, the vocabulary's byte table, masks that
keep every output inside its schema, grammar or regex (greedy and sampled), EOS exactly when the
grammar is complete, and constrained rows in a batch equal to the same rows alone."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

import lmx
from lmx.errors import InvalidOptionError
from lmx.generate.constraints import Constraint, ConstraintCompiler, token_bytes
from lmx.generate.options import GenerationOptions

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["name", "age", "color", "tags"],
    "additionalProperties": False,
}
REGEX = r"(cat|dog)s? [0-9]{1,3}\."
LARK = r"""
start: greeting " " NAME "!"
greeting: "hi" | "hello"
NAME: /[a-z]{2,6}/
"""
PROMPTS = ["Hello there", "The quick brown fox", "Once upon a time"]


def test_spec_is_canonical_hashable_and_checked() -> None:
    a = Constraint.json({"type": "object", "properties": {"x": {"type": "integer"}}})
    b = Constraint.json({"type": "object", "properties": {"x": {"type": "integer"}}})
    assert a == b and hash(a) == hash(b) and a.kind == "json"
    assert a.source == '{"type":"object","properties":{"x":{"type":"integer"}}}'  # compact, order kept
    assert json.loads(Constraint.json().source) == {"type": "object"}
    assert Constraint.regex("a+") != Constraint.lark("a+")
    for bad, words in [
        (lambda: Constraint("xml", "<a/>"), "one of json, lark, regex"),
        (lambda: Constraint.regex(""), "must not be empty"),
        (lambda: Constraint.json([1, 2]), "must be an object"),  # type: ignore[arg-type]
        (lambda: Constraint.json({"default": float("nan")}), "not JSON-serialisable"),
        (lambda: GenerationOptions(constraint={"type": "object"}), "Constraint.json(schema)"),  # type: ignore[arg-type]
    ]:
        with pytest.raises(InvalidOptionError, match=re.escape(words)):
            bad()
    # options stay hashable with a constraint
    assert hash(GenerationOptions(constraint=a)) == hash(GenerationOptions(constraint=b))


def test_byte_table_spells_encoded_text(engines: dict[str, lmx.Engine], arch: str) -> None:
    tok = engines[arch].tokenizer
    table, specials = token_bytes(tok, engines[arch].model.args.vocab_size)
    assert set(specials) >= set(tok.eos_token_ids)
    for text in ["Hello, world!", "  two  spaces\nand a tab\t", "naïve café — 日本語 🙂"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert b"".join(table[i] for i in ids) == text.encode("utf-8")


def _outputs(engine: lmx.Engine, constraint: Constraint, **opts: object) -> list[lmx.Completion]:
    # Greedy, then sampled with several seeds; room enough for the tiny byte-level models.
    runs = [engine.generate(p, constraint=constraint, max_tokens=400, **opts) for p in PROMPTS]  # type: ignore[arg-type]
    for seed in range(4):
        prompt = PROMPTS[seed % 3]
        runs.append(engine.generate(prompt, constraint=constraint, max_tokens=400, temperature=1.5, seed=seed, **opts))  # type: ignore[arg-type]
    return runs


def test_json_schema_outputs_validate(engines: dict[str, lmx.Engine], arch: str) -> None:
    for run in _outputs(engines[arch], Constraint.json(SCHEMA)):
        assert run.finish_reason == "stop", run.text
        jsonschema.validate(json.loads(run.text), SCHEMA)
        assert list(json.loads(run.text)) == list(SCHEMA["properties"])  # the schema's order


def test_regex_and_lark_outputs_match_exactly(engines: dict[str, lmx.Engine], arch: str) -> None:
    for run in _outputs(engines[arch], Constraint.regex(REGEX)):
        assert re.fullmatch(REGEX, run.text), run.text
        assert run.finish_reason == "stop"
    for run in _outputs(engines[arch], Constraint.lark(LARK), top_k=20):
        assert re.fullmatch(r"(hi|hello) [a-z]{2,6}!", run.text), run.text


def test_any_json_object(engines: dict[str, lmx.Engine]) -> None:
    engine = engines["qwen3"]
    for seed in range(3):
        run = engine.generate("Data:", constraint=Constraint.json(), max_tokens=120, temperature=1.0, seed=seed)
        if run.finish_reason == "stop":
            assert isinstance(json.loads(run.text), dict)
        else:  # cut by max_tokens: a prefix of an object
            assert run.finish_reason == "length" and run.text.startswith("{")


def test_eos_allowed_exactly_when_the_grammar_accepts(engines: dict[str, lmx.Engine]) -> None:
    engine = engines["gemma3"]
    tok = engine.tokenizer
    compiler = ConstraintCompiler(tok, tok.eos_token_ids, engine.model.args.vocab_size)
    eos = sorted(tok.eos_token_ids)[0]
    matcher = compiler.matcher(Constraint.regex("ab(cd)?"))
    assert not matcher.next_mask()[eos]
    for ch in "ab":
        (tid,) = [i for i in tok.encode(ch, add_special_tokens=False)]
        assert matcher.next_mask()[tid]
        matcher.consume(tid)
    mask = matcher.next_mask()
    assert mask[eos] and matcher.accepting  # "ab" is complete, "abcd" may follow
    assert mask[tok.encode("c", add_special_tokens=False)[0]]
    for tid in tok.encode("cd", add_special_tokens=False):
        matcher.consume(tid)
    mask = matcher.next_mask()
    assert set(mask.nonzero()[0].tolist()) == set(tok.eos_token_ids)  # complete: only EOS


def test_compiled_once_per_spec_and_bounded(engines: dict[str, lmx.Engine]) -> None:
    tok = engines["gemma3"].tokenizer
    compiler = ConstraintCompiler(tok, tok.eos_token_ids, 384, cache_size=2)
    first = compiler.compile(Constraint.regex("a+"))
    assert compiler.compile(Constraint.regex("a+")) is first
    compiler.compile(Constraint.regex("b+"))
    compiler.compile(Constraint.regex("c+"))
    assert compiler.compile(Constraint.regex("a+")) is not first  # evicted, compiled again


@pytest.mark.parametrize(
    ("constraint", "words"),
    [
        (Constraint.json({"type": "array", "uniqueItems": True}), "uniqueItems"),
        (Constraint.json({"type": "object", "propertyNames": {"pattern": "^a"}}), "propertyNames"),
        (Constraint.json({"not": {"type": "string"}}), "not"),
        (Constraint.json({"type": "string", "format": "no-such-format"}), "no-such-format"),
        (Constraint.json({"$ref": "http://example.com/schema.json"}), "http://example.com/schema.json"),
        (Constraint.regex("a(b"), "unclosed group"),
        (Constraint.lark("start: undefined_rule"), "undefined_rule"),
    ],
)
def test_unsupported_features_are_errors_naming_them(
    engines: dict[str, lmx.Engine], constraint: Constraint, words: str
) -> None:
    with pytest.raises(InvalidOptionError, match=re.escape(words)):
        engines["gemma3"].generate("Hi", constraint=constraint, max_tokens=4)


def test_constrained_rows_in_a_batch_equal_each_alone(engines: dict[str, lmx.Engine], arch: str) -> None:
    engine = engines[arch]
    requests = [
        (PROMPTS[0], {"constraint": Constraint.json(SCHEMA)}),
        (PROMPTS[1], {}),  # unconstrained, in the same batch
        (PROMPTS[2], {"constraint": Constraint.regex(REGEX)}),
        (PROMPTS[0], {"constraint": Constraint.lark(LARK), "max_tokens": 30}),
    ]
    alone = [engine.generate(p, **{"max_tokens": 40, **o}) for p, o in requests]  # type: ignore[arg-type]
    before = engine.stats().batched_steps
    streams = [engine.stream(p, **{"max_tokens": 40, **o}) for p, o in requests]  # type: ignore[arg-type]
    for s in streams:
        list(s)
    assert engine.stats().batched_steps > before  # the rows ran together
    for stream, a in zip(streams, alone):
        assert (stream.text, stream.tokens, stream.finish_reason) == (a.text, a.tokens, a.finish_reason)
    batch = engine.batch_generate(PROMPTS, constraint=Constraint.json(SCHEMA), max_tokens=60)
    assert [b.tokens for b in batch] == [
        engine.generate(p, constraint=Constraint.json(SCHEMA), max_tokens=60).tokens for p in PROMPTS
    ]

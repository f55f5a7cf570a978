"""GenerationOptions: defaults, normalisation, and every bad value rejected with a message naming it."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from lmx.errors import InvalidOptionError
from lmx.generate.options import GenerationOptions

FIELDS = [
    "max_tokens",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "repetition_context_size",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "seed",
    "stop",
    "logprobs",
    "adapter",
    "constraint",
    "speculative",
    "num_draft_tokens",
    "prompt_lookup_ngram",
]


def test_defaults() -> None:
    opts = GenerationOptions()
    assert [f.name for f in dataclasses.fields(opts)] == FIELDS
    assert (opts.max_tokens, opts.temperature, opts.top_k, opts.top_p, opts.min_p) == (256, 0.0, 0, 1.0, 0.0)
    assert (opts.repetition_penalty, opts.repetition_context_size) == (1.0, 64)
    assert (opts.presence_penalty, opts.frequency_penalty) == (0.0, 0.0)
    assert (opts.logit_bias, opts.seed, opts.stop, opts.logprobs) == (None, None, (), None)
    opts.validate()
    opts.validate(vocab_size=10)


def test_from_kwargs_normalises() -> None:
    opts = GenerationOptions.from_kwargs(
        stop="###", logit_bias={"5": 1, 7: -2.5}, temperature=1, repetition_penalty=np.float32(1.5), top_k=np.int64(3)
    )
    assert opts.stop == ("###",)
    assert dict(opts.logit_bias) == {5: 1.0, 7: -2.5}
    assert all(type(k) is int and type(v) is float for k, v in opts.logit_bias.items())
    assert type(opts.temperature) is float and opts.temperature == 1.0
    assert type(opts.repetition_penalty) is float and opts.repetition_penalty == 1.5
    assert type(opts.top_k) is int and opts.top_k == 3
    assert GenerationOptions.from_kwargs(stop=["a", 2, "b"]).stop == ("a", 2, "b")
    assert GenerationOptions.from_kwargs(stop=2).stop == (2,)


def test_from_kwargs_keeps_base_values() -> None:
    base = GenerationOptions(temperature=0.7, max_tokens=10, stop=("x",))
    opts = GenerationOptions.from_kwargs(base=base, top_k=5)
    assert (opts.temperature, opts.max_tokens, opts.stop, opts.top_k) == (0.7, 10, ("x",), 5)
    assert base.top_k == 0
    assert GenerationOptions.from_kwargs(base=base) == base


def test_frozen_and_logit_bias_read_only() -> None:
    source = {3: 1.0}
    opts = GenerationOptions.from_kwargs(logit_bias=source)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.top_k = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        opts.logit_bias[3] = 5.0  # type: ignore[index]
    source[3] = 99.0
    assert opts.logit_bias == {3: 1.0}
    assert hash(opts) == hash(GenerationOptions.from_kwargs(logit_bias={3: 1.0}))


@pytest.mark.parametrize(
    "name, value",
    [
        ("temperature", 0),
        ("top_p", 1.0),
        ("top_p", 1e-9),
        ("min_p", 0.0),
        ("min_p", 0.999),
        ("repetition_penalty", 1e-3),
        ("presence_penalty", -2),
        ("presence_penalty", 2),
        ("frequency_penalty", -2.0),
        ("logit_bias", {0: -100, "1": 100}),
        ("logit_bias", {}),
        ("seed", 0),
        ("seed", 2**64 - 1),
        ("logprobs", 0),
        ("logprobs", 20),
        ("max_tokens", 1),
        ("repetition_context_size", 1),
        ("stop", ()),
        ("stop", 0),
    ],
)
def test_boundary_values_accepted(name: str, value: object) -> None:
    GenerationOptions.from_kwargs(**{name: value}).validate(vocab_size=10)


NAN, INF = math.nan, math.inf

INVALID = [
    ("max_tokens", 0),
    ("max_tokens", -1),
    ("max_tokens", True),
    ("max_tokens", 1.5),
    ("max_tokens", 10.0),
    ("max_tokens", "10"),
    ("max_tokens", None),
    ("temperature", NAN),
    ("temperature", INF),
    ("temperature", -INF),
    ("temperature", -1),
    ("temperature", -0.1),
    ("temperature", "0.7"),
    ("temperature", True),
    ("temperature", None),
    ("top_k", -1),
    ("top_k", True),
    ("top_k", 2.0),
    ("top_p", 1.5),
    ("top_p", 1.0000001),
    ("top_p", 0),
    ("top_p", -0.1),
    ("top_p", NAN),
    ("top_p", INF),
    ("top_p", "0.9"),
    ("min_p", 1.0),
    ("min_p", 1.5),
    ("min_p", -0.1),
    ("min_p", NAN),
    ("repetition_penalty", 0),
    ("repetition_penalty", -1),
    ("repetition_penalty", NAN),
    ("repetition_penalty", INF),
    ("repetition_penalty", False),
    ("repetition_context_size", 0),
    ("repetition_context_size", -1),
    ("repetition_context_size", True),
    ("repetition_context_size", 1.0),
    ("presence_penalty", 2.5),
    ("presence_penalty", -2.1),
    ("presence_penalty", NAN),
    ("presence_penalty", INF),
    ("presence_penalty", "1"),
    ("frequency_penalty", 2.01),
    ("frequency_penalty", -3),
    ("frequency_penalty", NAN),
    ("logit_bias", [(1, 2.0)]),
    ("logit_bias", "x"),
    ("logit_bias", {"a": 1}),
    ("logit_bias", {"": 1}),
    ("logit_bias", {-1: 1}),
    ("logit_bias", {"-1": 1}),
    ("logit_bias", {True: 1}),
    ("logit_bias", {1.5: 1}),
    ("logit_bias", {1: 101}),
    ("logit_bias", {1: -100.5}),
    ("logit_bias", {1: NAN}),
    ("logit_bias", {1: INF}),
    ("logit_bias", {1: "x"}),
    ("logit_bias", {1: 1, "1": 2}),
    ("seed", -1),
    ("seed", 1.5),
    ("seed", True),
    ("seed", "42"),
    ("seed", 2**64),
    ("stop", ""),
    ("stop", [""]),
    ("stop", ["ok", ""]),
    ("stop", [1.5]),
    ("stop", [-1]),
    ("stop", [True]),
    ("stop", 3.5),
    ("stop", {"a"}),
    ("stop", None),
    ("logprobs", -1),
    ("logprobs", 21),
    ("logprobs", True),
    ("logprobs", 1.5),
    ("logprobs", "5"),
]


@pytest.mark.parametrize("name, value", INVALID)
def test_invalid_value_rejected(name: str, value: object) -> None:
    with pytest.raises(InvalidOptionError, match=name) as err:
        GenerationOptions.from_kwargs(**{name: value})
    assert isinstance(err.value, ValueError)
    with pytest.raises(InvalidOptionError, match=name):
        GenerationOptions(**{name: value})  # direct construction checks too


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
        ({"min_p": 1}, "min_p must be in [0, 1), got 1"),
        ({"temperature": -1}, "temperature must be >= 0, got -1"),
        ({"temperature": NAN}, "temperature must be a finite number, got nan"),
        ({"max_tokens": True}, "max_tokens must be an integer, got True (bool)"),
        ({"repetition_penalty": 0}, "repetition_penalty must be > 0, got 0"),
        ({"presence_penalty": 3}, "presence_penalty must be in [-2, 2], got 3"),
        ({"logprobs": 21}, "logprobs must be in [0, 20], got 21"),
        ({"logit_bias": {4: 150}}, "logit_bias[4] must be in [-100, 100], got 150"),
        ({"stop": ["a", ""]}, "stop strings must not be empty"),
    ],
)
def test_messages_name_value_and_allowed_range(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidOptionError) as err:
        GenerationOptions.from_kwargs(**kwargs)
    assert str(err.value) == message


def test_unknown_option_suggests_close_match() -> None:
    with pytest.raises(InvalidOptionError) as err:
        GenerationOptions.from_kwargs(temprature=0.5)
    msg = str(err.value)
    assert msg.startswith("unknown option 'temprature' (did you mean 'temperature'?); allowed: max_tokens, ")
    assert all(name in msg for name in FIELDS)


def test_unknown_option_without_close_match() -> None:
    with pytest.raises(InvalidOptionError) as err:
        GenerationOptions.from_kwargs(max_tokens=5, zzz=1)
    assert str(err.value).startswith("unknown option 'zzz'; allowed: ")
    assert "did you mean" not in str(err.value)


def test_validate_checks_token_ids_against_vocab() -> None:
    GenerationOptions.from_kwargs(logit_bias={99: 1.0}, stop=[99, "x"]).validate(vocab_size=100)
    with pytest.raises(InvalidOptionError, match=r"logit_bias token id 100 .*100 tokens"):
        GenerationOptions.from_kwargs(logit_bias={"100": 1.0}).validate(vocab_size=100)
    with pytest.raises(InvalidOptionError, match=r"stop token id 100 "):
        GenerationOptions.from_kwargs(stop=["x", 100]).validate(vocab_size=100)
    # Without a vocabulary size, any id >= 0 passes.
    GenerationOptions.from_kwargs(logit_bias={10**6: 1.0}, stop=[10**6]).validate()


@pytest.mark.parametrize("vocab_size", [0, -5, 1.5, True])
def test_validate_rejects_bad_vocab_size(vocab_size: object) -> None:
    with pytest.raises(InvalidOptionError, match="vocab_size"):
        GenerationOptions().validate(vocab_size=vocab_size)  # type: ignore[arg-type]


def test_validate_recheck_catches_bypassed_freeze() -> None:
    opts = GenerationOptions()
    object.__setattr__(opts, "top_p", 2.0)
    with pytest.raises(InvalidOptionError, match="top_p"):
        opts.validate()

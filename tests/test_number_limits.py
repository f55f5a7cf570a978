"""Integers of thousands of digits (issue 21, item 7): every option, token list and request
field holding one is a typed error naming it, never Python's raw ``ValueError`` ("Exceeds the
limit (4300 digits) for integer string conversion") or ``OverflowError``, nor a 500."""

from __future__ import annotations

import lmx  # isort: skip

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from lmx.errors import InvalidOptionError, LmxError, TokenizerError
from lmx.generate.options import GenerationOptions, check_token_ids, show_int
from lmx.server import BackgroundServer, ServerSettings

HUGE = 10**5000  # past Python's 4300-digit int/str limit
BIG = 10**4000  # under it, but past every range


@pytest.mark.parametrize(
    "option",
    [
        "max_tokens",
        "temperature",
        "top_k",
        "top_p",
        "min_p",
        "repetition_penalty",
        "repetition_context_size",
        "presence_penalty",
        "frequency_penalty",
        "seed",
        "logprobs",
    ],
)
@pytest.mark.parametrize("value", [HUGE, -HUGE], ids=["+10**5000", "-10**5000"])
def test_huge_integer_options_are_option_errors(option: str, value: int) -> None:
    if option in ("max_tokens", "top_k") and value > 0:  # valid: clamped at the context / vocabulary
        assert getattr(GenerationOptions.from_kwargs(**{option: value}), option) == value
        return
    with pytest.raises(InvalidOptionError, match=rf"^{option} must .*integer of about 500[01] digits"):
        GenerationOptions.from_kwargs(**{option: value})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"logit_bias": {HUGE: 1.0}}, r"logit_bias token id an integer of about 5001 digits is out of range"),
        ({"logit_bias": {"9" * 5000: 1.0}}, r"logit_bias keys must be token ids .*'9999.*\(5000 characters, str\)"),
        ({"logit_bias": {3: HUGE}}, r"logit_bias\[3\] must be a finite number, got an integer of about 5001 digits"),
        ({"stop": [HUGE]}, r"stop token id an integer of about 5001 digits is out of range"),
        ({"stop": [-HUGE]}, r"stop token ids must be >= 0, got a negative integer of about 5001 digits"),
    ],
    ids=["logit_bias key", "logit_bias key string", "logit_bias value", "stop id", "negative stop id"],
)
def test_huge_integers_in_mappings_and_lists(options: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidOptionError, match=message):
        GenerationOptions.from_kwargs(**options).validate(vocab_size=384)


def test_check_token_ids_and_show_int() -> None:
    assert check_token_ids((1, 2), 384) == [1, 2]
    with pytest.raises(InvalidOptionError, match=r"got \[an integer of about 5001 digits, 384\]"):
        check_token_ids([1, HUGE, 384], 384)
    with pytest.raises(InvalidOptionError, match=r"got \[384, 385, 386, 387, 388\] and 2 more"):
        check_token_ids(range(384, 391), 384)
    assert show_int(2**70) == "1180591620717411303424"
    assert show_int(-HUGE) == "a negative integer of about 5001 digits"


def test_huge_prompt_ids_and_decode_are_typed(engine: lmx.Engine) -> None:
    reference = engine.generate([2, 3], max_tokens=3).tokens
    for ids in ([HUGE], [2, 3, -HUGE], [BIG]):
        with pytest.raises(InvalidOptionError, match=r"prompt token ids must be in \[0, \d+\), got \[a"):
            engine.generate(ids, max_tokens=2)
    for ids, allowed in (([HUGE], "< 2"), ([-HUGE], ">= 0"), ([2**40], "< 2")):
        with pytest.raises(TokenizerError, match=rf"token ids must be {allowed}.*, got (an integer of \d+ bits|\d+)"):
            engine.tokenizer.decode(ids)
    assert engine.generate([2, 3], max_tokens=3).tokens == reference


# ------------------------------------------------------------------------------------------ server
@pytest.fixture(scope="module")
def server(engine: lmx.Engine) -> Iterator[BackgroundServer]:
    with BackgroundServer(ServerSettings(port=0, model_name="tiny"), engine) as server:
        yield server


def post(server: BackgroundServer, route: str, body: bytes) -> httpx.Response:
    return httpx.post(server.url + route, content=body, headers={"Content-Type": "application/json"}, timeout=60)


HUGE_TEXT = "9" * 5000
BIG_TEXT = "9" * 4000
CASES = [
    ("/v1/completions", '{"model":"tiny","prompt":"hi","max_tokens":2,"seed":%s}', HUGE_TEXT, "seed"),
    ("/v1/completions", '{"model":"tiny","prompt":"hi","max_tokens":%s}', "-" + HUGE_TEXT, "max_tokens"),
    ("/v1/completions", '{"model":"tiny","prompt":[2,%s],"max_tokens":2}', HUGE_TEXT, "prompt[1]"),
    ("/v1/completions", '{"model":"tiny","prompt":"hi","max_tokens":2,"logit_bias":{"3":%s}}', HUGE_TEXT, "logit_bias"),
    ("/v1/completions", '{"model":"tiny","prompt":"hi","max_tokens":2,"stop":[%s]}', HUGE_TEXT, "stop[0]"),
    (
        "/v1/chat/completions",
        '{"model":"tiny","messages":[{"role":"user","content":"hi"}],"top_k":%s}',
        HUGE_TEXT,
        "top_k",
    ),
    ("/v1/completions", '{"model":"tiny","prompt":"hi","max_tokens":2,"seed":%s}', BIG_TEXT, "seed"),
    ("/v1/completions", '{"model":"tiny","prompt":"hi","max_tokens":2,"temperature":%s}', BIG_TEXT, "temperature"),
    ("/v1/completions", '{"model":"tiny","prompt":"hi","max_tokens":2,"stop":[%s]}', BIG_TEXT, "stop"),
    ("/v1/completions", '{"model":"tiny","prompt":"hi","max_tokens":2,"logit_bias":{"3":%s}}', BIG_TEXT, "logit_bias"),
]


@pytest.mark.parametrize(
    ("route", "template", "number", "param"),
    CASES,
    ids=[
        f"{c[3]}-{'5000' if c[2] == HUGE_TEXT else '4000'}-digits{'-negative' if c[2][0] == '-' else ''}" for c in CASES
    ],
)
def test_huge_numbers_in_a_request_are_400_naming_the_field(
    server: BackgroundServer, route: str, template: str, number: str, param: str
) -> None:
    r = post(server, route, (template % number).encode())
    assert r.status_code == 400, r.text[:300]
    error = r.json()["error"]
    assert error["param"] == param and ("digits" in error["message"] or "finite" in error["message"]), error
    assert len(error["message"]) < 400  # the number is described, not echoed


def test_huge_numbers_in_ollama_options_are_400(server: BackgroundServer) -> None:
    for number in (HUGE_TEXT, BIG_TEXT):
        body = '{"model":"tiny","prompt":"hi","stream":false,"options":{"seed":' + number + "}}"
        r = post(server, "/api/generate", body.encode())
        assert r.status_code == 400 and "seed" in r.json()["error"], r.text[:300]
    ok = post(server, "/v1/completions", b'{"model":"tiny","prompt":"hi","max_tokens":2}')
    assert ok.status_code == 200


def test_every_error_above_is_an_lmx_error() -> None:
    for options in ({"seed": HUGE}, {"temperature": HUGE}, {"logit_bias": {HUGE: 1}}):
        with pytest.raises(LmxError):
            GenerationOptions.from_kwargs(**options).validate(vocab_size=384)

"""Stop strings (issue 21, "Also measure"): the matcher scales with the text, not with the
number of stop strings, and keeps its exact semantics; the number and size of stop strings
per request are capped."""

from __future__ import annotations

import lmx  # isort: skip

import random

import httpx
import pytest

from lmx.errors import InvalidOptionError
from lmx.generate.options import MAX_STOP_CHARS, MAX_STOPS, GenerationOptions
from lmx.generate.stopping import StopStringMatcher
from lmx.server import BackgroundServer, ServerSettings


class LinearMatcher:
    """The matcher as it was (every stop string searched on every piece): the reference."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return buf[: min(hits)]
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:n]):
                    best = n
                    break
        self._held = buf[len(buf) - best :]
        return buf[: len(buf) - best]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held


def run(matcher: StopStringMatcher | LinearMatcher, pieces: list[str]) -> tuple[list[str], bool, str]:
    out = [matcher.feed(p) for p in pieces]
    return out, matcher.stopped, matcher.flush()


@pytest.mark.parametrize("seed", range(300))
def test_same_output_as_the_linear_matcher(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = "ab" if seed % 3 else "abc\u00e9\U0001f600"
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 6))]
    pieces, i = [], 0
    while i < len(text):
        n = rng.randint(0, 4)
        pieces.append(text[i : i + n])
        i += n
    assert run(StopStringMatcher(stops), pieces) == run(LinearMatcher(stops), pieces), (stops, pieces)


@pytest.mark.parametrize(
    ("stops", "pieces", "expected"),
    [
        (["abcd", "c"], ["ab", "cd"], (["", ""], True, "")),  # the earlier start wins, even if it ends later
        (["bc", "abcde"], ["abcd", "x"], (["a", ""], True, "")),
        (["xyz"], ["axy", "zb"], (["a", ""], True, "")),
        (["aab"], ["a", "a", "a", "b"], (["", "", "a", ""], True, "")),
        (["ab", "b"], ["cb"], (["c"], True, "")),
        (["abc"], ["ab"], ([""], False, "ab")),  # held back, then released at the end
        ([""], ["text"], (["text"], False, "")),
    ],
)
def test_overlapping_and_partial_stops(stops: list[str], pieces: list[str], expected: tuple) -> None:
    assert run(StopStringMatcher(stops), pieces) == expected
    assert run(LinearMatcher(stops), pieces) == expected


def test_hundreds_of_thousands_of_stop_strings() -> None:
    # Correct with 480,000 stop strings (issue 21's case); the time per token is in benchmarks/.
    rng = random.Random(0)
    stops = {"".join(rng.choice("abcdefghij") for _ in range(8)) for _ in range(480_000)}
    stops.discard("abcdefgh")
    matcher = StopStringMatcher([*stops, "abcdefgh"])
    text = "".join(rng.choice("klmnop ") for _ in range(200))
    assert matcher.feed(text) == text and not matcher.stopped
    assert matcher.feed("xxabcdefg") == "xx"  # "abcdefg" may still become "abcdefgh"
    assert matcher.feed("hzz") == "" and matcher.stopped


def test_stop_caps_are_option_errors() -> None:
    GenerationOptions(stop=tuple(f"s{i}" for i in range(MAX_STOPS)))
    GenerationOptions(stop=("x" * MAX_STOP_CHARS,))
    with pytest.raises(InvalidOptionError, match=rf"stop has {MAX_STOPS + 1} entries; at most {MAX_STOPS}"):
        GenerationOptions(stop=tuple(f"s{i}" for i in range(MAX_STOPS + 1)))
    with pytest.raises(InvalidOptionError, match=rf"stop strings hold {MAX_STOP_CHARS + 1} characters; at most"):
        GenerationOptions(stop=("x" * MAX_STOP_CHARS, "y"))
    with pytest.raises(InvalidOptionError, match="at most"):
        GenerationOptions.from_kwargs(stop=list(range(480_000)))


def test_stop_caps_over_http(engine: lmx.Engine) -> None:
    with BackgroundServer(ServerSettings(port=0, model_name="tiny"), engine) as server:
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 2, "stop": [f"s{i}" for i in range(MAX_STOPS + 1)]}
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "stop", r.text[:300]
        body["stop"] = body["stop"][:MAX_STOPS]
        assert httpx.post(server.url + "/v1/completions", json=body, timeout=60).status_code == 200

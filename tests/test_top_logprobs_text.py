"""``Token.top_logprobs`` carries each alternative's text as well as its id (issue 16, part 4),
and stays the ``(id, logprob)`` pairs it was for callers that unpack them."""

from __future__ import annotations

import pickle

import lmx
from lmx import TopLogprob


def test_top_logprobs_carry_text(engine: lmx.Engine) -> None:
    result = engine.generate("Once upon a time", max_tokens=4, logprobs=3)
    assert result.top_logprobs is not None and len(result.top_logprobs) == len(result.tokens)
    for top in result.top_logprobs:
        assert len(top) == 3
        for alt in top:
            assert isinstance(alt, TopLogprob)
            assert alt.text == engine.tokenizer.decode([alt.id], skip_special_tokens=False)
            tid, lp = alt  # still a pair
            assert (tid, lp) == alt and alt.id == tid and alt.logprob == lp
    streamed = [t.top_logprobs for t in engine.stream("Once upon a time", max_tokens=4, logprobs=3)]
    assert [[a.text for a in top] for top in streamed] == [[a.text for a in top] for top in result.top_logprobs]


def test_top_logprob_is_a_plain_pair_to_old_code() -> None:
    alt = TopLogprob(7, -0.5, "the")
    assert alt == (7, -0.5) and tuple(alt) == (7, -0.5) and dict([alt]) == {7: -0.5}
    again = pickle.loads(pickle.dumps(alt))
    assert again == alt and again.text == "the"
    assert repr(alt) == "TopLogprob(id=7, logprob=-0.5, text='the')"


def test_remote_chat_top_logprobs_carry_text(engine: lmx.Engine) -> None:
    from lmx.server import BackgroundServer, ServerSettings

    messages = [{"role": "user", "content": "Hi"}]
    with (
        BackgroundServer(ServerSettings(port=0, warm_up=False), engine) as server,
        lmx.RemoteBackend(server.url) as remote,
    ):
        got = remote.chat(messages, max_tokens=3, logprobs=2)
        text = remote.generate("Once upon", max_tokens=3, logprobs=2)
    want = engine.chat(messages, max_tokens=3, logprobs=2)
    assert [[a.text for a in top] for top in got.top_logprobs] == [[a.text for a in top] for top in want.top_logprobs]
    direct = engine.generate("Once upon", max_tokens=3, logprobs=2)
    for got_top, want_top in zip(text.top_logprobs, direct.top_logprobs):
        for a, b in zip(got_top, want_top):
            assert a.text in (b.text, "")  # "" only where two alternatives share a logprob

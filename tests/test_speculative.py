"""Speculative decoding: greedy output is plain decoding's, token for token.

Prompt lookup and draft models only change how many forward passes a greedy row takes: its
tokens, text, finish reason and logprobs must be those of plain decoding, with stops, EOS and
``max_tokens`` falling inside an accepted run of drafts exactly where plain decoding stops.
Which positions come inside an accepted run is worked out here from the plain output and the
drafting rule (:func:`lmx.generate.speculative.prompt_lookup`), so the stops are put there.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import lmx  # isort: skip
import numpy as np
import pytest

from lmx.errors import DraftModelError, InvalidOptionError
from lmx.generate.speculative import prompt_lookup

NO_EOS = {1: -100.0, 2: -100.0, 6: -100.0, 106: -100.0}  # tiny vocabularies: keep rows running
# Repetitive text: the tiny random models repeat themselves, so prompt lookup drafts and some drafts hold.
PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog. Hello world!"


@pytest.fixture
def cold(tiny_dirs: dict[str, Path]) -> Iterator[Callable[..., lmx.Engine]]:
    """Fresh engines without a prefix cache."""
    made: list[lmx.Engine] = []

    def make(path: str | Path, **kwargs) -> lmx.Engine:
        engine = lmx.load(tiny_dirs.get(path, path), prompt_cache=False, **kwargs)  # type: ignore[call-overload]
        made.append(engine)
        return engine

    yield make
    for e in made:
        e.close()


def accepted_positions(prompt: list[int], out: list[int], k: int, ngram: int) -> list[tuple[int, int]]:
    """(position, run length) of each output token that a prompt-lookup run hands over as an
    accepted draft (not as the model's own pending token), replaying the drafting rule."""
    found = []
    i = 1  # out[0] comes from the prefill
    while i < len(out):
        drafts = prompt_lookup(prompt + out[:i], min(k, len(out) - i), ngram)
        n = 0
        while n < len(drafts) and i + n < len(out) and drafts[n] == out[i + n]:
            n += 1
        found += [(i + j, n) for j in range(n)]
        i += n + 1
    return found


def rejected_positions(prompt: list[int], out: list[int], k: int, ngram: int) -> list[int]:
    """Sequence positions (prompt included) where a prompt-lookup run drafts a token the model
    rejects, so its cache positions are trimmed again."""
    found = []
    i = 1
    while i < len(out):
        drafts = prompt_lookup(prompt + out[:i], min(k, len(out) - i), ngram)
        n = 0
        while n < len(drafts) and i + n < len(out) and drafts[n] == out[i + n]:
            n += 1
        if n < len(drafts) and i + n < len(out):
            found.append(len(prompt) + i + n)
        i += n + 1
    return found


# ---------------------------------------------------------------------------- drafting rule
def test_prompt_lookup_drafts_what_followed_the_latest_match() -> None:
    seq = [5, 6, 7, 8, 9, 1, 5, 6, 7, 2, 3, 5, 6, 7]
    assert prompt_lookup(seq, 3, 3) == [2, 3, 5]  # the latest earlier "5 6 7" is followed by 2 3 5
    assert prompt_lookup(seq, 1, 3) == [2]
    assert prompt_lookup(seq, 9, 4) == []  # "3 5 6 7" occurs only at the end
    assert prompt_lookup([1, 5, 6, 7, 8, 1, 5, 6, 7], 9, 4) == [8, 1, 5, 6, 7]  # up to the end, not past it
    assert prompt_lookup([1, 2, 3, 9, 2, 3], 4, 3) == []  # no earlier "9 2 3", and no shorter n-gram is tried
    assert prompt_lookup([1, 2, 3, 9, 2, 3], 4, 2) == [9, 2, 3]  # "2 3" occurred at 1; the draft stops at the end
    assert prompt_lookup([7, 1, 7], 5, 1) == [1, 7]
    assert prompt_lookup([7, 1, 7], 5, 3) == []  # shorter than the n-gram and a token


# ---------------------------------------------------------------------------- greedy identity
@pytest.mark.parametrize("k", [1, 4, 7])
def test_prompt_lookup_equals_plain_decoding(cold, arch: str, k: int) -> None:
    engine = cold(arch)
    opts = {"max_tokens": 80, "logit_bias": NO_EOS, "logprobs": 3}
    plain = engine.generate(PROMPT, **opts)
    spec = engine.generate(PROMPT, speculative="prompt-lookup", num_draft_tokens=k, **opts)
    assert (spec.tokens, spec.text, spec.finish_reason) == (plain.tokens, plain.text, plain.finish_reason)
    np.testing.assert_allclose(spec.logprobs, plain.logprobs, atol=1e-4, rtol=0)
    assert [[t for t, _ in top] for top in spec.top_logprobs] == [[t for t, _ in top] for top in plain.top_logprobs]
    ids = engine.tokenizer.encode(PROMPT)
    runs = accepted_positions(ids, plain.tokens, k, 3)
    assert runs, "no draft was accepted: the test would not exercise acceptance"
    assert spec.metrics.accepted_tokens == len(runs)
    assert spec.metrics.draft_tokens >= spec.metrics.accepted_tokens
    assert plain.metrics.draft_tokens == 0


def test_gemma_beyond_the_sliding_window(cold) -> None:
    """The tiny Gemma's window is 8 positions; its rotating caches first move their contents
    past ``window + slack`` = 264 positions: rejected drafts are trimmed from them after that too."""
    engine = cold("gemma3")
    prompt = "def add(a, b):\n    return a + b\n"
    opts = {"max_tokens": 400, "logit_bias": NO_EOS, "repetition_penalty": 1.5, "repetition_context_size": 8}
    plain = engine.generate(prompt, **opts)
    spec = engine.generate(prompt, speculative="prompt-lookup", num_draft_tokens=6, prompt_lookup_ngram=2, **opts)
    assert spec.tokens == plain.tokens
    np.testing.assert_allclose(spec.logprobs, plain.logprobs, atol=1e-4, rtol=0)
    late = [p for p in rejected_positions(engine.tokenizer.encode(prompt), plain.tokens, 6, 2) if p > 300]
    assert len(late) > 5
    assert spec.metrics.draft_tokens > spec.metrics.accepted_tokens > 0


def test_penalties_and_bias_see_each_drafted_position(cold, arch: str) -> None:
    engine = cold(arch)
    opts = {
        "max_tokens": 60,
        "logit_bias": NO_EOS,
        "repetition_penalty": 1.3,
        "repetition_context_size": 16,
        "presence_penalty": 0.4,
        "frequency_penalty": 0.3,
    }
    plain = engine.generate(PROMPT, **opts)
    spec = engine.generate(PROMPT, speculative="prompt-lookup", num_draft_tokens=5, prompt_lookup_ngram=1, **opts)
    assert spec.tokens == plain.tokens
    np.testing.assert_allclose(spec.logprobs, plain.logprobs, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------- ends inside a run
# The model drafting for itself: every draft holds, so a verify pass hands over K accepted
# drafts and the model's own next token, and output position p (p >= 1) is the
# ((p - 1) % (K + 1))-th of its run: K means the pending token, below K an accepted draft.
K = 5
VARIED = {"max_tokens": 80, "logit_bias": NO_EOS, "repetition_penalty": 1.5, "repetition_context_size": 8}


def inside_runs(out: list[int]) -> list[int]:
    """Positions of first occurrences that a self-drafting run hands over as accepted drafts
    with more drafts after them in the same run (so a stop there drops accepted drafts)."""
    return [p for p in range(1, len(out)) if (p - 1) % (K + 1) < K - 1 and out[p] not in out[:p]]


@pytest.fixture
def self_drafting(cold, tiny_dirs: dict[str, Path], arch: str) -> tuple[lmx.Engine, lmx.Engine, list[int]]:
    """A plain engine, one drafting with its own weights, and the plain output (all drafts accepted)."""
    plain = cold(arch)
    spec = cold(arch, draft_model=tiny_dirs[arch])
    out = plain.generate(PROMPT, **VARIED)
    check = spec.generate(PROMPT, num_draft_tokens=K, **VARIED)
    assert check.tokens == out.tokens
    assert check.metrics.accepted_tokens == check.metrics.draft_tokens > 50  # the runs are as inside_runs says
    assert len(inside_runs(out.tokens)) >= 3
    return plain, spec, out.tokens


def test_stop_ids_and_strings_inside_an_accepted_run(self_drafting) -> None:
    plain, spec, out = self_drafting
    base = VARIED
    tried = 0
    for p in inside_runs(out)[:4]:
        piece = plain.tokenizer.decode(out[p : p + 1])
        stops: list[list] = [[out[p]]]
        if piece.strip() and piece not in plain.tokenizer.decode(out[:p]):
            stops.append([piece])
        for stop in stops:
            want = plain.generate(PROMPT, stop=stop, **base)
            got = spec.generate(PROMPT, stop=stop, num_draft_tokens=K, **base)
            assert (got.tokens, got.text, got.finish_reason) == (want.tokens, want.text, want.finish_reason)
            assert want.finish_reason == "stop"
            if isinstance(stop[0], int):
                assert want.tokens == out[: p + 1]
            tried += 1
    assert tried >= 3


def test_eos_inside_an_accepted_run(self_drafting, cold, tiny_dirs: dict[str, Path], tmp_path: Path, arch) -> None:
    """A model whose generation config names an EOS id that comes inside an accepted run."""
    _, _, out = self_drafting
    p = inside_runs(out)[0]
    model_dir = tmp_path / "eos"
    shutil.copytree(tiny_dirs[arch], model_dir)
    config = json.loads((model_dir / "generation_config.json").read_text())
    config["eos_token_id"] = [1, out[p]]
    (model_dir / "generation_config.json").write_text(json.dumps(config))
    plain = cold(model_dir)
    spec = cold(model_dir, draft_model=model_dir)
    base = VARIED
    want = plain.generate(PROMPT, **base)
    got = spec.generate(PROMPT, num_draft_tokens=K, **base)
    assert want.tokens == out[: p + 1] and want.finish_reason == "stop"
    assert (got.tokens, got.text, got.finish_reason) == (want.tokens, want.text, want.finish_reason)
    lookup = plain.generate(PROMPT, speculative="prompt-lookup", **base)
    assert (lookup.tokens, lookup.text, lookup.finish_reason) == (want.tokens, want.text, want.finish_reason)


def test_max_tokens_inside_a_run(self_drafting) -> None:
    plain, spec, _ = self_drafting
    base = {k: v for k, v in VARIED.items() if k != "max_tokens"}
    for n in (1, 2, 3, 5, 8, 13, 21):
        want = plain.generate(PROMPT, max_tokens=n, **base)
        for got in (
            spec.generate(PROMPT, max_tokens=n, num_draft_tokens=K, **base),
            plain.generate(PROMPT, max_tokens=n, speculative="prompt-lookup", num_draft_tokens=6, **base),
        ):
            assert (got.tokens, got.text, got.finish_reason) == (want.tokens, want.text, want.finish_reason)
            assert len(got.tokens) == n and got.finish_reason == "length"


# ---------------------------------------------------------------------------- where it does not run
def test_sampled_rows_decode_plainly(cold, arch: str) -> None:
    engine = cold(arch)
    opts = {"max_tokens": 30, "temperature": 0.8, "top_k": 20, "seed": 5, "logit_bias": NO_EOS}
    plain = engine.generate(PROMPT, **opts)
    spec = engine.generate(PROMPT, speculative="prompt-lookup", **opts)
    assert spec.tokens == plain.tokens
    assert spec.metrics.draft_tokens == 0


def test_a_row_joining_ends_the_speculation_and_both_equal_alone(cold, arch: str) -> None:
    engine = cold(arch)
    opts = {"max_tokens": 120, "logit_bias": NO_EOS, "speculative": "prompt-lookup"}
    alone_long = engine.generate(PROMPT, **opts)
    alone_short = engine.generate("Hello world! How are you", **{**opts, "max_tokens": 20})
    before = engine.stats()
    running = engine.stream(PROMPT, **opts)
    got = [next(running).id for _ in range(10)]  # speculating alone...
    joined = engine.generate("Hello world! How are you", **{**opts, "max_tokens": 20})  # ...until this joins
    got += [t.id for t in running]
    after = engine.stats()
    assert got == alone_long.tokens and joined.tokens == alone_short.tokens
    assert after.batched_steps > before.batched_steps  # the two rows ran plain batched steps
    assert after.speculative_steps > before.speculative_steps


# ---------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"speculative": "ngram"}, "speculative must be None, 'prompt-lookup' or 'draft-model', got 'ngram'"),
        ({"num_draft_tokens": 0}, "num_draft_tokens must be in [1, 32], got 0"),
        ({"prompt_lookup_ngram": 17}, "prompt_lookup_ngram must be in [1, 16], got 17"),
        ({"speculative": "draft-model"}, "needs a draft model"),
    ],
)
def test_bad_options_are_refused(cold, options: dict, message: str) -> None:
    engine = cold("gemma3")
    with pytest.raises(InvalidOptionError) as err:
        engine.generate("Hello", **options)
    assert message in str(err.value)


def test_load_refuses_draft_model_mode_without_a_draft(tiny_dirs: dict[str, Path]) -> None:
    with pytest.raises(InvalidOptionError, match="needs draft_model"):
        lmx.load(tiny_dirs["gemma3"], speculative="draft-model")


# ---------------------------------------------------------------------------- draft model
@pytest.fixture(scope="module")
def small_drafts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Other tiny models of the same vocabulary (same tokenizer, fewer layers, other weights)."""
    from tiny_models import save_tiny

    out = {}
    for arch, layers in (("gemma3", 2), ("qwen3", 2)):
        d = tmp_path_factory.mktemp(f"draft-{arch}")
        save_tiny(
            arch,
            d,
            num_hidden_layers=layers,
            **({"layer_types": ["sliding_attention", "full_attention"]} if arch == "gemma3" else {}),
        )
        out[arch] = d
    return out


def test_a_small_draft_model_gives_plain_decoding(cold, small_drafts: dict[str, Path], arch: str) -> None:
    plain_engine = cold(arch)
    engine = cold(arch, draft_model=small_drafts[arch])
    opts = {"max_tokens": 60, "logit_bias": NO_EOS, "logprobs": 2}
    plain = plain_engine.generate(PROMPT, **opts)
    spec = engine.generate(PROMPT, num_draft_tokens=4, **opts)  # speculative="draft-model" is the default
    assert (spec.tokens, spec.text, spec.finish_reason) == (plain.tokens, plain.text, plain.finish_reason)
    np.testing.assert_allclose(spec.logprobs, plain.logprobs, atol=1e-4, rtol=0)
    assert spec.metrics.draft_tokens > 0
    off = engine.generate(PROMPT, speculative=None, **opts)  # a request may turn it off
    assert off.tokens == plain.tokens and off.metrics.draft_tokens == 0


def test_the_model_as_its_own_draft_is_accepted_throughout(cold, tiny_dirs: dict[str, Path], arch: str) -> None:
    """Drafted by the same weights, every draft is the model's own choice: acceptance ~100%,
    and the stream is plain decoding's, across the sliding window and with a stop inside a run."""
    plain_engine = cold(arch)
    engine = cold(arch, draft_model=tiny_dirs[arch])
    opts = {"max_tokens": 100, "logit_bias": NO_EOS}
    plain = plain_engine.generate(PROMPT, **opts)
    spec = engine.generate(PROMPT, num_draft_tokens=5, **opts)
    assert spec.tokens == plain.tokens
    m = spec.metrics
    assert m.draft_tokens > 50 and m.accepted_tokens >= 0.95 * m.draft_tokens
    stop = plain.tokens[37]
    want = plain_engine.generate(PROMPT, stop=[stop], **opts)
    got = engine.generate(PROMPT, stop=[stop], num_draft_tokens=5, **opts)
    assert (got.tokens, got.text, got.finish_reason) == (want.tokens, want.text, want.finish_reason)


def test_a_draft_model_of_another_vocabulary_is_refused(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    other = tmp_path / "other-vocab"
    shutil.copytree(tiny_dirs["gemma3"], other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(DraftModelError, match="the vocabularies differ: token") as err:
        lmx.load(tiny_dirs["gemma3"], draft_model=other)
    assert repr(a) in str(err.value) or repr(b) in str(err.value)


# ---------------------------------------------------------------------------- server
def test_server_default_and_per_request_field(tiny_dirs: dict[str, Path]) -> None:
    import httpx

    from lmx.server import BackgroundServer, ServerSettings

    bias = {str(k): v for k, v in NO_EOS.items()}
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 40, "temperature": 0, "logit_bias": bias}
    with lmx.load(tiny_dirs["gemma3"], prompt_cache=False) as engine:
        plain = engine.generate(PROMPT, max_tokens=40, logit_bias=NO_EOS)
        settings = ServerSettings(port=0, model_name="tiny", speculative="prompt-lookup", warm_up=False)
        with BackgroundServer(settings, engine) as server:
            url = server.url + "/v1/completions"
            default = httpx.post(url, json=body, timeout=60).json()
            off = httpx.post(url, json={**body, "speculative": None}, timeout=60).json()
            tuned = httpx.post(url, json={**body, "num_draft_tokens": 2, "prompt_lookup_ngram": 1}, timeout=60).json()
            bad = httpx.post(url, json={**body, "speculative": "ngram"}, timeout=60)
            no_draft = httpx.post(url, json={**body, "speculative": "draft-model"}, timeout=60)
            ollama = httpx.post(
                server.url + "/api/generate",
                json={"model": "tiny", "prompt": PROMPT, "raw": True, "stream": False,
                      "options": {"num_predict": 40, "temperature": 0, "speculative": "prompt-lookup"}},
                timeout=60,
            )  # fmt: skip
    for reply in (default, off, tuned):
        assert reply["choices"][0]["text"] == plain.text
    assert default["metrics"]["draft_tokens"] > 0 and tuned["metrics"]["draft_tokens"] > 0
    assert off["metrics"]["draft_tokens"] == 0
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "speculative"
    assert "'prompt-lookup' or 'draft-model', got 'ngram'" in bad.json()["error"]["message"]
    assert no_draft.status_code == 400 and "needs a draft model" in no_draft.json()["error"]["message"]
    assert ollama.status_code == 200 and ollama.json()["response"] == plain.text


def test_server_settings_refuse_a_bad_default() -> None:
    from lmx.server import ServerSettings

    with pytest.raises(InvalidOptionError, match="speculative must be None"):
        ServerSettings(speculative="fast")
    with pytest.raises(InvalidOptionError, match="needs draft_model"):
        ServerSettings(speculative="draft-model")


# ---------------------------------------------------------------------------- the real 270M
@pytest.mark.slow
def test_real_270m_copying_prompt_equals_plain_decoding() -> None:
    """The bundled Gemma 3 270M (GGUF, lmx's CPU kernels on the CPU) editing a given piece of
    code: prompt lookup drafts from the prompt, and the output is plain decoding's."""
    from lmx.bench_speculative import TASKS

    messages = [{"role": "user", "content": TASKS["rename-variable"]}]
    with lmx.load(None, prompt_cache=False) as engine:
        plain = engine.chat(messages, max_tokens=96, logprobs=1)
        spec = engine.chat(messages, max_tokens=96, logprobs=1, speculative="prompt-lookup")
    assert (spec.tokens, spec.text, spec.finish_reason) == (plain.tokens, plain.text, plain.finish_reason)
    np.testing.assert_allclose(spec.logprobs, plain.logprobs, atol=2e-3, rtol=0)
    assert "def variance(values):" in plain.text  # it copies the code it was given
    m = spec.metrics
    assert m.draft_tokens > 40 and m.accepted_tokens > 0.6 * m.draft_tokens


# ---------------------------------------------------------------------------- command line
def test_generate_command_speculates_with_the_same_output(tiny_dirs: dict[str, Path]) -> None:
    from test_cli import run

    model = str(tiny_dirs["gemma3"])
    common = ["generate", PROMPT, "--model", model, "-n", "40"]
    plain = run(*common)
    lookup = run(*common, "--speculative", "prompt-lookup", "--num-draft-tokens", "3")
    drafted = run(*common, "--draft-model", model)
    bad = run(*common, "--speculative", "draft-model")
    for out in (plain, lookup, drafted):
        assert out.returncode == 0, out.stderr
        assert out.stdout == plain.stdout
    assert "drafted tokens accepted" in lookup.stderr and "drafted tokens accepted" in drafted.stderr
    assert "drafted" not in plain.stderr
    assert bad.returncode != 0 and "needs a draft model" in bad.stderr


# ---------------------------------------------------------------------------- the benchmark
def test_speculative_bench_runs_pairs_and_checks_identity(tiny_dirs: dict[str, Path]) -> None:
    from lmx.bench_speculative import run_speculative_benchmark

    result = run_speculative_benchmark(str(tiny_dirs["gemma3"]), gen_tokens=12, repeat=2, tasks=["quote", "summarise"])
    data = result.as_dict()
    assert data["repeat"] == 2 and [r["task"] for r in data["runs"]] == ["quote", "summarise"] * 2
    assert data["all"]["identical"] is True
    for run in data["runs"]:
        assert run["draft_tokens"] >= run["accepted_tokens"] >= 0 and run["verify_passes"] >= 1
    total = data["all"]
    drafted = sum(r["draft_tokens"] for r in data["runs"])
    if drafted:
        assert total["acceptance_rate"] == sum(r["accepted_tokens"] for r in data["runs"]) / drafted
    with pytest.raises(InvalidOptionError, match="needs --draft-model"):
        run_speculative_benchmark(str(tiny_dirs["gemma3"]), mode="draft-model")

"""Embeddings: ``engine.embed`` against transformers (the reference), batched against alone, and
``/v1/embeddings``, ``/api/embed`` and ``/api/embeddings`` through the real ``openai`` and
``ollama`` clients against a live server."""

from __future__ import annotations

import lmx  # isort: skip

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import ollama
import openai
import pytest
import torch

from lmx.errors import ContextLengthError, InvalidOptionError
from lmx.server import BackgroundServer, ServerSettings

pytest_plugins = ["conftest_gguf"]

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hi",
    "def add(a, b):\n    return a + b\n" * 12,  # past the tiny Gemma's sliding window and one prefill chunk
    "Numbers: 1 2 3 4 5 6 7 8 9 10",
]


def reference_embedding(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    """Mean of transformers' final-norm hidden states over the tokens, L2-normalised."""
    with torch.no_grad():
        h = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0].double()
    mean = h.mean(dim=0)
    return (mean / mean.norm()).numpy()


def test_embeddings_equal_transformers(engines: dict[str, lmx.Engine], references: dict, arch: str) -> None:
    engine, ref = engines[arch], references[arch]
    vectors = np.array(engine.embed(TEXTS))
    assert vectors.shape == (len(TEXTS), engine.info().hidden_size)
    assert len(engine.tokenizer.encode(TEXTS[2])) > 128  # more than one prefill chunk on the CPU
    for text, vector in zip(TEXTS, vectors):
        expected = reference_embedding(ref, engine.tokenizer.encode(text))
        np.testing.assert_allclose(vector, expected, atol=2e-5)
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    # Not the same vector for every text: pooling follows the input.
    assert np.abs(vectors[0] - vectors[1]).max() > 1e-3


def test_batched_equals_alone_and_batch_size_changes_nothing(engine: lmx.Engine) -> None:
    together = np.array(engine.embed(TEXTS))
    alone = np.array([engine.embed(t)[0] for t in TEXTS])
    in_pairs = np.array(engine.embed(TEXTS, batch_size=2))
    np.testing.assert_allclose(together, alone, atol=1e-5)
    np.testing.assert_allclose(in_pairs, alone, atol=1e-5)
    ids = engine.tokenizer.encode(TEXTS[0])
    np.testing.assert_allclose(engine.embed([ids])[0], alone[0], atol=1e-6)  # token ids as input
    np.testing.assert_allclose(engine.embed(ids)[0], alone[0], atol=1e-6)  # one id list alone


def test_embedding_between_decode_steps_changes_no_generation(engine: lmx.Engine) -> None:
    expected = engine.generate("Once upon a time", max_tokens=40).text
    vectors: list = []
    stream = engine.stream("Once upon a time", max_tokens=40)
    first = next(stream)
    worker = threading.Thread(target=lambda: vectors.extend(engine.embed(TEXTS)))
    worker.start()
    rest = "".join(t.text for t in stream)
    worker.join()
    assert first.text + rest == expected
    np.testing.assert_allclose(np.array(vectors), np.array(engine.embed(TEXTS)), atol=1e-5)


def test_bad_inputs_are_typed_errors(engine: lmx.Engine) -> None:
    with pytest.raises(InvalidOptionError, match=r"input\[1\] is empty"):
        engine.embed(["fine", ""])
    with pytest.raises(InvalidOptionError, match=r"input\[0\] token ids must be in \[0, "):
        engine.embed([[1, 10**9]])
    with pytest.raises(InvalidOptionError, match=r"input\[0\] must be a string or a list of token ids, got float"):
        engine.embed([1.5])
    with pytest.raises(InvalidOptionError, match="batch_size must be an integer >= 1, got 0"):
        engine.embed(["x"], batch_size=0)
    with pytest.raises(ContextLengthError, match=r"input\[0\] has 600 tokens; the model's context length is 512"):
        engine.embed([[5] * 600])
    assert engine.embed([]) == []


# ------------------------------------------------------------------ the server
@pytest.fixture(scope="module")
def server(engine: lmx.Engine) -> Iterator[BackgroundServer]:
    settings = ServerSettings(port=0, model_name="tiny", max_embed_inputs=4, warm_up=False)
    with BackgroundServer(settings, engine) as server:
        yield server


def test_openai_client_embeddings(server: BackgroundServer, engine: lmx.Engine) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)
    expected = np.array(engine.embed(TEXTS))
    # The client asks for base64 by default and decodes it (float32): to float32 precision.
    out = client.embeddings.create(model="tiny", input=TEXTS)
    assert [d.index for d in out.data] == [0, 1, 2, 3] and out.model == "tiny"
    np.testing.assert_allclose(np.array([d.embedding for d in out.data]), expected, atol=1e-6)
    n_tokens = sum(len(engine.tokenizer.encode(t)) for t in TEXTS)
    assert out.usage.prompt_tokens == out.usage.total_tokens == n_tokens
    floats = client.embeddings.create(model="tiny", input=TEXTS[0], encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, expected[0], atol=1e-6)
    ids = engine.tokenizer.encode(TEXTS[1])
    by_ids = client.embeddings.create(model="tiny", input=[ids, engine.tokenizer.encode(TEXTS[0])])
    np.testing.assert_allclose(by_ids.data[0].embedding, expected[1], atol=1e-6)
    np.testing.assert_allclose(by_ids.data[1].embedding, expected[0], atol=1e-6)
    assert by_ids.usage.prompt_tokens == len(ids) + len(engine.tokenizer.encode(TEXTS[0]))
    size = engine.info().hidden_size
    same = client.embeddings.create(model="tiny", input="x", dimensions=size)
    assert len(same.data[0].embedding) == size


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"input": []}, "input", "input must hold at least one text"),
        ({"input": ["a"] * 5}, "input", "input may hold at most 4 inputs (the server's max_embed_inputs), got 5"),
        ({"input": ["a", ""]}, "input", r"input[1] is empty"),
        ({"input": [[1, 10**9]]}, "input", "input[0] token ids must be in [0, "),
        ({"input": [[5] * 600]}, "input", "input[0] has 600 tokens; the model's context length is 512"),
        ({"input": "a", "encoding_format": "int8"}, "encoding_format", "invalid value for 'encoding_format'"),
        ({"input": "a", "dimensions": 8}, "dimensions", "dimensions must be the model's hidden size 64"),
        ({"input": 3}, "input", "invalid value for 'input'"),
        ({"input": "a", "pooling": "cls"}, "pooling", "unrecognized request argument 'pooling'"),
    ],
)
def test_bad_requests_are_400_naming_the_field(server: BackgroundServer, body: dict, param: str, message: str) -> None:
    r = httpx.post(server.url + "/v1/embeddings", json={"model": "tiny", **body}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"]
    assert error["type"] == "invalid_request_error"


def test_ollama_client_embed(server: BackgroundServer, engine: lmx.Engine) -> None:
    client = ollama.Client(host=server.url)
    expected = np.array(engine.embed(TEXTS))
    out = client.embed(model="tiny", input=TEXTS)
    np.testing.assert_allclose(np.array(out.embeddings), expected, atol=1e-6)
    assert out.prompt_eval_count == sum(len(engine.tokenizer.encode(t)) for t in TEXTS)
    one = client.embed(model="tiny", input=TEXTS[1])
    np.testing.assert_allclose(one.embeddings[0], expected[1], atol=1e-6)
    legacy = client.embeddings(model="tiny", prompt=TEXTS[0])
    np.testing.assert_allclose(legacy.embedding, expected[0], atol=1e-6)
    # truncate (default true) cuts a text longer than the context; false refuses it.
    long = "word " * 700
    cut = client.embed(model="tiny", input=long)
    ids = engine.tokenizer.encode(long)[:512]
    np.testing.assert_allclose(cut.embeddings[0], engine.embed([ids])[0], atol=1e-6)
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model="tiny", input=long, truncate=False)
    assert e.value.status_code == 400 and "context length is 512" in e.value.error
    r = httpx.post(server.url + "/api/embed", json={"model": "tiny", "input": []})
    assert r.status_code == 400 and r.json() == {"error": "input must hold at least one text, got an empty list"}


@pytest.mark.slow
def test_real_model_batched_equals_alone(gemma_gguf: Path) -> None:
    texts = ["The cat sat on the mat.", "Paris is the capital of France.", "x = 1"]
    with lmx.load(gemma_gguf) as engine:
        together = np.array(engine.embed(texts))
        alone = np.array([engine.embed(t)[0] for t in texts])
        assert together.shape == (3, 640)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(together, alone, atol=2e-4)

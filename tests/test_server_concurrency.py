"""Several clients at once: the fair FIFO queue, the bounded queue (503 when full), and
clients that go away (their generation stops, or their place in the queue is freed)."""

from __future__ import annotations

import lmx  # isort: skip

import json
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from lmx.server import BackgroundServer, ServerSettings

LONG = 480  # tokens: seconds of work for the tiny model, far longer than any step of these tests
PROMPTS = ["Hello there", "The quick brown fox", "def add(a, b):", "Numbers 12345"]


@pytest.fixture(scope="module")
def server(engine: lmx.Engine) -> Iterator[BackgroundServer]:
    settings = ServerSettings(port=0, model_name="tiny", max_queue=3, max_concurrency=1)  # one at a time
    with BackgroundServer(settings, engine) as server:
        yield server


def health(server: BackgroundServer) -> dict[str, Any]:
    return httpx.get(server.url + "/health").json()


def wait_until(server: BackgroundServer, predicate: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
    """Poll /health until ``predicate`` holds (a failure bound, not a timing assertion)."""
    stop = threading.Event()
    for _ in range(3000):
        state = health(server)
        if predicate(state):
            return state
        stop.wait(0.01)
    raise AssertionError(f"the server never reached: {what}; last /health: {state}")


def raw_request(server: BackgroundServer, path: str, body: dict[str, Any]) -> socket.socket:
    """Send a request on a bare socket, so the test decides exactly when the client goes away."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    sock.sendall(head.encode() + data)
    return sock


def long_chat(stream: bool = True) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": "Go on"}], "max_tokens": LONG, "stream": stream}


def stream_text(server: BackgroundServer, prompt: str, max_tokens: int = 8) -> tuple[str, str | None]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0) as client:
        chunks = list(
            client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, stream=True
            )
        )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks[-1].choices[0].finish_reason


def test_simultaneous_streams_all_complete_correctly(server: BackgroundServer, engine: lmx.Engine) -> None:
    expected = [engine.chat([{"role": "user", "content": p}], max_tokens=8).text for p in PROMPTS]
    before = health(server)["requests"]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = list(pool.map(lambda p: stream_text(server, p), PROMPTS))
    assert [text for text, _ in results] == expected
    assert all(finish == "length" for _, finish in results)
    after = wait_until(server, lambda h: h["queue"]["running"] == 0, "idle")["requests"]
    assert after["completed"] == before["completed"] + len(PROMPTS)
    assert after["rejected"] == before["rejected"]


def test_queue_is_first_come_first_served(server: BackgroundServer) -> None:
    blocker = raw_request(server, "/v1/chat/completions", long_chat())
    wait_until(server, lambda h: h["queue"]["running"] == 1, "the long request running")
    finished: list[str] = []
    lock = threading.Lock()

    def run(prompt: str) -> None:
        stream_text(server, prompt, max_tokens=3)
        with lock:
            finished.append(prompt)

    def arrived(h: dict[str, Any]) -> int:  # requests the scheduler has seen, in any state
        return sum(h["requests"][k] for k in ("completed", "cancelled", "failed")) + sum(
            h["queue"][k] for k in ("running", "waiting")
        )

    base = arrived(health(server))
    threads = []
    for i, prompt in enumerate(PROMPTS[:3]):
        threads.append(threading.Thread(target=run, args=(prompt,)))
        threads[-1].start()
        # Start the next client only once this one is queued (or, on a very slow machine, done).
        wait_until(server, lambda h, n=i + 1: arrived(h) >= base + n, f"request {i + 1} queued")
    blocker.close()
    for t in threads:
        t.join(60)
    assert finished == PROMPTS[:3]


def test_full_queue_answers_503(server: BackgroundServer) -> None:
    socks = [raw_request(server, "/v1/chat/completions", long_chat())]
    wait_until(server, lambda h: h["queue"]["running"] == 1, "the long request running")
    for n in range(1, 4):
        socks.append(raw_request(server, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2}))
        wait_until(server, lambda h, n=n: h["queue"]["waiting"] == n, f"{n} waiting")
    rejected_before = health(server)["requests"]["rejected"]
    try:
        r = httpx.post(server.url + "/v1/chat/completions", json=long_chat(stream=False))
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        error = r.json()["error"]
        assert error["code"] == "queue_full" and error["type"] == "server_overloaded"
        assert "max_queue=3" in error["message"]
        ollama = httpx.post(server.url + "/api/generate", json={"model": "tiny", "prompt": "x"})
        assert ollama.status_code == 503 and "retry later" in ollama.json()["error"]
        with openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0) as client:
            with pytest.raises(openai.InternalServerError) as e:
                client.completions.create(model="tiny", prompt="x", max_tokens=1)
            assert e.value.status_code == 503
        assert health(server)["requests"]["rejected"] == rejected_before + 3
    finally:
        for sock in socks:
            sock.close()
    wait_until(
        server,
        lambda h: h["queue"] == {"running": 0, "waiting": 0, "max_queue": 3, "max_concurrency": 1},
        "an empty queue",
    )


def test_disconnected_stream_frees_its_slot(server: BackgroundServer, engine: lmx.Engine) -> None:
    expected = engine.chat([{"role": "user", "content": "Hi"}], max_tokens=5).text
    before = health(server)["requests"]
    with httpx.Client(base_url=server.url, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json=long_chat()) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            result: dict[str, Any] = {}
            body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}
            waiter = threading.Thread(
                target=lambda: result.update(
                    httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
                )
            )
            waiter.start()
            wait_until(server, lambda h: h["queue"]["waiting"] == 1, "the second request waiting")
        # Leaving the block closes the connection mid-stream: the server stops that generation.
        waiter.join(60)
    assert result["choices"][0]["message"]["content"] == expected
    after = wait_until(server, lambda h: h["queue"]["running"] == 0, "idle")["requests"]
    assert after["cancelled"] == before["cancelled"] + 1  # stopped early: not counted as completed
    assert after["completed"] == before["completed"] + 1


def test_client_leaving_a_non_streaming_request_or_the_queue(server: BackgroundServer) -> None:
    before = health(server)["requests"]
    running = raw_request(server, "/v1/chat/completions", long_chat(stream=False))
    wait_until(server, lambda h: h["queue"]["running"] == 1, "the request running")
    waiting = raw_request(server, "/api/chat", {**long_chat(), "options": {"num_predict": LONG}})
    wait_until(server, lambda h: h["queue"]["waiting"] == 1, "a request waiting")
    waiting.close()
    wait_until(server, lambda h: h["queue"]["waiting"] == 0, "the waiting request dropped")
    running.close()
    after = wait_until(server, lambda h: h["queue"]["running"] == 0, "the running request stopped")["requests"]
    assert after["cancelled"] == before["cancelled"] + 2
    assert after["completed"] == before["completed"]


# ------------------------------------------------------------------ batching (max_concurrency > 1)


@pytest.fixture(scope="module")
def batch_server(engine: lmx.Engine) -> Iterator[BackgroundServer]:
    settings = ServerSettings(port=0, model_name="tiny", max_queue=8, max_concurrency=4)
    with BackgroundServer(settings, engine) as server:
        yield server


def beside_a_long_request(server: BackgroundServer, bodies: list[dict[str, Any]], run: Callable) -> list[Any]:
    """Start a long streaming request, then ``run(body)`` each of ``bodies`` on its own thread
    while it decodes: they join its batch mid-flight. The long request is then dropped."""
    blocker = raw_request(server, "/v1/chat/completions", long_chat())
    wait_until(server, lambda h: h["queue"]["running"] == 1, "the long request running")
    try:
        with ThreadPoolExecutor(len(bodies)) as pool:
            return [f.result(timeout=120) for f in [pool.submit(run, body) for body in bodies]]
    finally:
        blocker.close()


def completion_stream(server: BackgroundServer, body: dict[str, Any]) -> dict[str, Any]:
    """Stream a /v1/completions request; its text, finish reason and usage."""
    with openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0) as client:
        chunks = list(client.completions.create(**body, stream=True, stream_options={"include_usage": True}))
    return {
        "text": "".join(c.choices[0].text for c in chunks if c.choices),
        "finish": next(c.choices[0].finish_reason for c in reversed(chunks) if c.choices),
        "usage": chunks[-1].usage.completion_tokens,
    }


def test_requests_join_a_running_batch_with_their_own_results(
    batch_server: BackgroundServer, engine: lmx.Engine
) -> None:
    bodies = [
        {"model": "tiny", "prompt": "Hello there", "max_tokens": 9},
        {"model": "tiny", "prompt": "The quick brown fox jumps", "max_tokens": 4, "temperature": 0.9, "seed": 7},
        {"model": "tiny", "prompt": "def add(a, b):", "max_tokens": 12, "top_p": 0.7, "temperature": 1.1, "seed": 3},
        {"model": "tiny", "prompt": "Numbers 12345", "max_tokens": 6, "frequency_penalty": 0.5},
    ]
    opts = [{k: v for k, v in b.items() if k not in ("model", "prompt")} for b in bodies]
    alone = [engine.generate(b["prompt"], **o) for b, o in zip(bodies, opts)]
    before = health(batch_server)["requests"]
    results = beside_a_long_request(batch_server, bodies, lambda b: completion_stream(batch_server, b))
    assert [r["text"] for r in results] == [c.text for c in alone]
    assert [r["usage"] for r in results] == [len(c.tokens) for c in alone]
    assert [r["finish"] for r in results] == [c.finish_reason for c in alone]
    after = wait_until(batch_server, lambda h: h["queue"]["running"] == 0, "idle")["requests"]
    assert after["batches"] > before["batches"]  # they decoded beside the long request
    assert after["completed"] == before["completed"] + 4 and after["cancelled"] == before["cancelled"] + 1


def test_stop_strings_and_a_client_leaving_a_batch(batch_server: BackgroundServer, engine: lmx.Engine) -> None:
    first = engine.generate("Hello there", max_tokens=12).text
    stop = first[len(first) // 2 :][:3] or first  # a stop string the reply reaches
    bodies = [
        {"model": "tiny", "prompt": "Hello there", "max_tokens": 12, "stop": [stop]},
        {"model": "tiny", "prompt": "leaves", "max_tokens": LONG},
        {"model": "tiny", "prompt": "Numbers 12345", "max_tokens": 10},
    ]
    alone = [
        engine.generate(b["prompt"], max_tokens=b["max_tokens"], stop=b.get("stop", [])) for b in [bodies[0], bodies[2]]
    ]
    before = health(batch_server)["requests"]

    def run(body: dict[str, Any]) -> Any:
        if body["prompt"] != "leaves":
            return completion_stream(batch_server, body)
        sock = raw_request(batch_server, "/v1/completions", {**body, "stream": True})
        assert sock.recv(4096)  # headers or a first chunk: it runs
        sock.close()  # ...and goes away mid-batch
        return None

    results = beside_a_long_request(batch_server, bodies, run)
    assert [results[0]["text"], results[2]["text"]] == [c.text for c in alone]
    assert results[0]["finish"] == "stop" and stop not in results[0]["text"]
    after = wait_until(batch_server, lambda h: h["queue"]["running"] == 0, "idle")["requests"]
    assert after["batches"] > before["batches"]
    assert after["cancelled"] == before["cancelled"] + 2  # the long request and the client that left
    assert after["completed"] == before["completed"] + 2

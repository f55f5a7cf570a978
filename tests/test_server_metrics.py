"""``GET /metrics``: Prometheus counters, histograms and gauges of a live server, scraped with
httpx and parsed with prometheus_client's own text parser."""

from __future__ import annotations

import lmx  # isort: skip

import argparse
from collections.abc import Iterator

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lmx.cli import serve
from lmx.server import BackgroundServer, ServerSettings

KEY = "metrics-key"
PROMPT = "The quick brown fox jumps over the lazy dog and then the dog"


def scrape(server: BackgroundServer, headers: dict[str, str] | None = None) -> dict[tuple[str, tuple], float]:
    """Every sample of ``/metrics`` as ``{(name, sorted labels): value}``."""
    r = httpx.get(server.url + "/metrics", headers=headers or {}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def server(engine: lmx.Engine) -> Iterator[BackgroundServer]:
    with BackgroundServer(ServerSettings(port=0, model_name="tiny"), engine) as server:
        yield server


def test_counters_move_by_what_the_requests_did(server: BackgroundServer, engine: lmx.Engine) -> None:
    before = scrape(server)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)
    a = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=7, temperature=0)
    # The same prompt again: its prefix (all but the last token) comes from the prefix cache.
    b = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    usage = chunks[-1].usage
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=-3)
    assert httpx.get(server.url + "/nope").status_code == 404
    after = scrape(server)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("lmx_requests_total", route="/v1/completions", status="200") == 2
    assert delta("lmx_requests_total", route="/v1/completions", status="400") == 1
    assert delta("lmx_requests_total", route="/v1/chat/completions", status="200") == 1
    assert delta("lmx_requests_total", route="other", status="404") == 1
    prompt = a.usage.prompt_tokens + b.usage.prompt_tokens + usage.prompt_tokens
    assert delta("lmx_prompt_tokens_total") == prompt
    generated = a.usage.completion_tokens + b.usage.completion_tokens + usage.completion_tokens
    assert generated == 7 + 5 + 4
    assert delta("lmx_generated_tokens_total") == generated
    cached = b.usage.prompt_tokens_details.cached_tokens
    assert cached == b.usage.prompt_tokens - 1  # the whole prompt but its last token
    assert delta("lmx_cached_prompt_tokens_total") == cached + usage.prompt_tokens_details.cached_tokens
    # One first token per request; one gap between each two tokens of a request.
    assert delta("lmx_time_to_first_token_seconds_count") == 3
    assert delta("lmx_inter_token_latency_seconds_count") == generated - 3
    assert delta("lmx_time_to_first_token_seconds_sum") > 0
    assert delta("lmx_inter_token_latency_seconds_bucket", le="+Inf") == generated - 3
    stats = engine.stats()
    assert value(after, "lmx_prefix_cache_hit_ratio") == pytest.approx(stats.prefix.hits / stats.prefix.lookups)
    assert 0 < value(after, "lmx_prefix_cache_hit_ratio") < 1
    assert value(after, "lmx_prefix_cache_bytes") == stats.prefix.bytes > 0


def test_load_gauges_show_a_running_request(server: BackgroundServer) -> None:
    idle = scrape(server)
    assert value(idle, "lmx_batch_size") == 0 and value(idle, "lmx_queue_depth") == 0
    assert value(idle, "lmx_kv_cache_bytes") == 0
    body = {"model": "tiny", "prompt": "Count:", "max_tokens": 100_000, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # the request is running now
        busy = scrape(server)
    assert value(busy, "lmx_batch_size") == 1
    assert value(busy, "lmx_kv_cache_bytes") > 0


def test_each_app_counts_apart(engine: lmx.Engine, server: BackgroundServer) -> None:
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 2}
    assert httpx.post(server.url + "/v1/completions", json=body, timeout=60).status_code == 200
    with BackgroundServer(ServerSettings(port=0, model_name="tiny", warm_up=False), engine) as other:
        assert httpx.get(other.url + "/health").status_code == 200
        fresh = scrape(other)
    assert value(fresh, "lmx_generated_tokens_total") == 0
    assert value(fresh, "lmx_requests_total", route="/health", status="200") == 1
    assert value(scrape(server), "lmx_generated_tokens_total") > 0


def test_metrics_need_the_key_unless_public(engine: lmx.Engine) -> None:
    settings = ServerSettings(port=0, model_name="tiny", api_key=KEY, warm_up=False)
    with BackgroundServer(settings, engine) as server:
        r = httpx.get(server.url + "/metrics")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(server.url + "/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        samples = scrape(server, {"Authorization": f"Bearer {KEY}"})
        assert value(samples, "lmx_requests_total", route="/metrics", status="401") == 2
    public = ServerSettings(port=0, model_name="tiny", api_key=KEY, public_metrics=True, warm_up=False)
    with BackgroundServer(public, engine) as server:
        assert httpx.get(server.url + "/metrics").status_code == 200
        # Only /metrics opens: the API still needs the key.
        body = {"model": "tiny", "prompt": "Hi", "max_tokens": 1}
        assert httpx.post(server.url + "/v1/completions", json=body).status_code == 401
        assert httpx.get(server.url + "/metrics/x").status_code == 401


def test_cli_flag_sets_public_metrics() -> None:
    p = argparse.ArgumentParser(prog="lmx")
    serve.register(p.add_subparsers(dest="command", required=True))
    assert p.parse_args(["serve", "--public-metrics"]).public_metrics is True
    assert p.parse_args(["serve"]).public_metrics is False

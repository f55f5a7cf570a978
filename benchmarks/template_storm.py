"""A hostile chat-template storm against ``lmx serve`` (issue 21, item 1), then a normal request.

The server allows request templates (``allow_request_chat_template``, off by default) so the
storm reaches the renderer: looping, memory-hungry and recursive templates, sent concurrently.
Each must be answered 400 ``chat_template_error`` within the time limit, and afterwards a normal
chat request must take what it took before the storm.

Usage: python benchmarks/template_storm.py [--storm 32] [--model PATH]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

import lmx
from lmx.server import BackgroundServer, ServerSettings

HOSTILE = [
    "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
    "{{ 'x' * 30000000 }}",
    "{% macro f(n) %}{% if n < 40 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}{% endmacro %}{{ f(0) }}",
    "{% set s = 'x' * 1000000 %}{% set t %}{% for i in range(5000) %}{{ s }}{% endfor %}{% endset %}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{{ 1 / 0 }}",
]
NORMAL = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8, "temperature": 0}


def timed_normal(client: httpx.Client, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        r = client.post("/v1/chat/completions", json={"model": "m", **NORMAL})
        assert r.status_code == 200, r.text
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--storm", type=int, default=32, help="hostile requests, sent 8 at a time")
    ap.add_argument("--model", default=None)
    ap.add_argument("--normal", type=int, default=5, help="normal requests timed before and after")
    args = ap.parse_args()
    engine = lmx.load(args.model)
    settings = ServerSettings(port=0, model_name="m", allow_request_chat_template=True, warm_up=True)
    with BackgroundServer(settings, engine) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        before = timed_normal(client, args.normal)

        def hostile(i: int) -> tuple[int, str, float]:
            body = {"model": "m", **NORMAL, "chat_template_kwargs": {"chat_template": HOSTILE[i % len(HOSTILE)]}}
            start = time.perf_counter()
            r = client.post("/v1/chat/completions", json=body)
            return r.status_code, r.json()["error"]["code"], time.perf_counter() - start

        start = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(hostile, range(args.storm)))
        storm_s = time.perf_counter() - start
        after = timed_normal(client, args.normal)
    statuses = sorted({(s, c) for s, c, _ in answers})
    result = {
        "normal_before_s": statistics.median(before),
        "storm_requests": args.storm,
        "storm_answers": [f"{s} {c}" for s, c in statuses],
        "storm_wall_s": storm_s,
        "storm_slowest_answer_s": max(t for _, _, t in answers),
        "normal_after_s": statistics.median(after),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

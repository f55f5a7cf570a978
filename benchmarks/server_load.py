"""Load test of `lmx serve`: N concurrent streaming clients for a fixed time, loopback only.

    python benchmarks/server_load.py [--model PATH] [--clients 32] [--duration 60]
        [--max-tokens 16] [--max-concurrency 8] [--mixed] [--device cpu|gpu] [--json out.json]

Starts `lmx serve` in a child process on 127.0.0.1 (a free port, a random API key, a wait
queue deep enough for every client), then runs ``--clients`` clients, each on its own
keep-alive connection, each sending streaming ``/v1/completions`` requests back to back
(greedy, or with ``--mixed`` cycling through four sampling configurations: greedy,
seeded top-p, top-p, greedy with penalties; a different prompt every time) until ``--duration`` seconds have passed. Requests
still running then are let finish (up to ``--drain`` seconds more); the script then checks
that the server is idle and healthy, stops it and prints one table.

An error is any request that does not end in HTTP 200 with a complete SSE stream
(``finish_reason`` and ``[DONE]``), or a connection failure. Time to first token is from
sending the request to the first chunk with text; it includes the wait in the queue (with
``--max-concurrency 1`` the server runs one request at a time; above 1, up to that many are
decoded together). Tokens/s is the sum of generated tokens over the wall
time from the first request to the last response.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx

TOPICS = [
    "the ocean", "a lighthouse", "mountains", "a library", "rain", "trains", "bees", "the moon",
    "bread", "a river", "winter", "clocks", "a garden", "bridges", "owls", "the desert",
]  # fmt: skip


@dataclass
class Outcome:
    client: int
    ttft: float | None = None
    total: float = 0.0
    tokens: int = 0
    error: str | None = None


@dataclass
class Run:
    outcomes: list[Outcome] = field(default_factory=list)
    t_start: float = 0.0
    t_end: float = 0.0
    cut: int = 0  # clients still running at the drain limit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, port: int, key: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lmx.cli.main", "serve", "--port", str(port), "--model-name", "bench"]
    cmd += ["--max-queue", str(args.clients), "--max-concurrency", str(args.max_concurrency)]
    cmd += ["--log-level", "warning", "--no-lab"]
    if args.model:
        cmd += ["--model", args.model]
    if args.device:
        cmd += ["--device", args.device]
    proc = subprocess.Popen(cmd, env={**os.environ, "LMX_API_KEY": key})
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not come up within 600 s")


# --mixed: requests cycle through these sampling options (each client starts at its own place)
MIXED = [
    {"temperature": 0},
    {"temperature": 0.8, "top_p": 0.9, "seed": 1},
    {"temperature": 1.0, "top_p": 0.95},
    {"temperature": 0, "frequency_penalty": 0.3, "presence_penalty": 0.2},
]


async def one_request(client: httpx.AsyncClient, n: int, i: int, max_tokens: int, mixed: bool = False) -> Outcome:
    body = {
        "model": "bench",
        "prompt": f"Request {i} of client {n}. A short paragraph about {TOPICS[(n + i) % len(TOPICS)]}:",
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **(MIXED[(n + i) % len(MIXED)] if mixed else {}),
    }
    if mixed and "seed" in body:
        body["seed"] = n * 1000 + i
    out = Outcome(client=n)
    t0 = time.perf_counter()
    finished = done = False
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                out.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return out
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    done = True
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    out.error = f"error event: {chunk['error']}"
                for choice in chunk.get("choices", []):
                    if choice.get("text") and out.ttft is None:
                        out.ttft = time.perf_counter() - t0
                    finished |= choice.get("finish_reason") is not None
                if chunk.get("usage"):
                    out.tokens = chunk["usage"]["completion_tokens"]
    except (httpx.HTTPError, OSError, json.JSONDecodeError) as e:
        out.error = f"{type(e).__name__}: {e}"
    out.total = time.perf_counter() - t0
    if out.error is None and not (finished and done):
        out.error = f"incomplete stream (finish_reason seen: {finished}, [DONE] seen: {done})"
    return out


async def client_loop(n: int, args: argparse.Namespace, url: str, key: str, stop_at: float, run: Run) -> None:
    timeout = httpx.Timeout(args.duration + args.drain, connect=10)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout) as client:
        i = 0
        while time.monotonic() < stop_at:
            run.outcomes.append(await one_request(client, n, i, args.max_tokens, args.mixed))
            run.t_end = time.perf_counter()
            i += 1


async def load(args: argparse.Namespace, url: str, key: str) -> Run:
    run = Run(t_start=time.perf_counter())
    stop_at = time.monotonic() + args.duration
    tasks = [asyncio.create_task(client_loop(n, args, url, key, stop_at, run)) for n in range(args.clients)]
    _, pending = await asyncio.wait(tasks, timeout=args.duration + args.drain)
    for task in pending:  # past the drain limit: cut (reported, not counted as server errors)
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    run.cut = len(pending)
    return run


def wait_idle(url: str, timeout: float = 30.0) -> dict:
    """``/health`` once nothing runs or waits (a cut request takes a moment to wind down)."""
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(url + "/health").json()
        queue = health.get("queue", {})
        if (queue.get("running"), queue.get("waiting")) == (0, 0) or time.monotonic() > deadline:
            return health
        time.sleep(0.2)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model to serve (default: the bundled Gemma 3 270M)")
    p.add_argument("--device", default=None, choices=["cpu", "gpu"])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=60.0, help="seconds during which clients send requests")
    p.add_argument("--drain", type=float, default=600.0, help="seconds to let running requests finish afterwards")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-concurrency", type=int, default=8, help="the server's --max-concurrency (batch size)")
    p.add_argument("--mixed", action="store_true", help="requests cycle through four sampling configurations")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()

    port, key = free_port(), "sk-load-" + secrets.token_hex(8)
    url = f"http://127.0.0.1:{port}"
    proc = start_server(args, port, key)
    try:
        unauthorized = httpx.get(url + "/v1/models").status_code
        run = asyncio.run(load(args, url, key))
        health = wait_idle(url)
    finally:
        proc.terminate()
        proc.wait(30)

    ok = [o for o in run.outcomes if o.error is None]
    errors = [o for o in run.outcomes if o.error is not None]
    wall = run.t_end - run.t_start
    ttft = [o.ttft for o in ok if o.ttft is not None]
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "command": " ".join(["python", *sys.argv]),
        "clients": args.clients,
        "duration_s": args.duration,
        "max_tokens": args.max_tokens,
        "max_concurrency": args.max_concurrency,
        "mixed_options": args.mixed,
        "requests": len(run.outcomes),
        "completed": len(ok),
        "errors": len(errors),
        "error_samples": sorted({o.error for o in errors if o.error})[:5],
        "cut_at_drain_limit": run.cut,
        "clients_served": len({o.client for o in ok}),
        "ttft_p50_s": statistics.median(ttft) if ttft else None,
        "ttft_p99_s": percentile(ttft, 99) if ttft else None,
        "ttft_max_s": max(ttft) if ttft else None,
        "tokens": sum(o.tokens for o in ok),
        "wall_s": wall,
        "tokens_per_s": sum(o.tokens for o in ok) / wall if wall > 0 else None,
        "requests_per_s": len(ok) / wall if wall > 0 else None,
        "unauthorized_status": unauthorized,
        "health_after": health,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    healthy = health.get("status") == "ok" and health["queue"]["running"] == 0 and health["queue"]["waiting"] == 0
    if errors or not healthy or unauthorized != 401 or not ok:
        raise SystemExit("load test FAILED: see errors / health above")


if __name__ == "__main__":
    main()

"""Slow-body storm against `lmx serve`: does a normal request still get its normal speed?

    python benchmarks/slow_body_storm.py [--model PATH] [--sockets 2000] [--storm-seconds 30]
        [--body-timeout 5] [--max-connections 128] [--max-tokens 16] [--json out.json]

Starts `lmx serve` in a child process on 127.0.0.1 (a free port, a random API key; the bundled
model unless ``--model``), then:

1. times ``--repeats`` authenticated greedy chat completions (``before``);
2. opens ``--sockets`` connections as fast as it can, half of them with the key and half
   without; each sends a request head announcing a 100 kB body and then trickles one byte
   every ``--trickle`` seconds until the server answers or closes, or the storm ends
   (``--storm-seconds``: the script stops by itself); with ``--reconnect`` each socket comes
   back as soon as it is answered, so ``--sockets`` stay open for the whole storm;
3. while the storm runs, times one authenticated completion (``during``; a 503 at the
   connection cap is retried after its ``Retry-After``, as the openai client does);
4. ``--settle`` seconds after the storm, times ``--repeats`` completions again (``after``).

Prints one JSON object: the three timings, how the storm's sockets were answered (401 at once,
408 after ``--body-timeout``, 503 beyond ``--max-connections``, or still open at the end), the
server's ``refused_connections`` counts, and how many lines (and tracebacks) the server logged.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, port: int, key: str, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lmx.cli.main", "serve", "--port", str(port), "--model-name", "bench"]
    cmd += ["--body-timeout", str(args.body_timeout), "--max-connections", str(args.max_connections)]
    cmd += ["--log-level", "warning", "--no-lab"]
    if args.model:
        cmd += ["--model", args.model]
    out = log.open("w")
    proc = subprocess.Popen(cmd, env={**os.environ, "LMX_API_KEY": key}, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start within 600 s")


def completion(url: str, key: str, max_tokens: int, budget: float = 120.0) -> tuple[float, int]:
    """Seconds for one greedy chat completion (503s retried after Retry-After) and the 503 count."""
    body = {"model": "bench", "messages": [{"role": "user", "content": "Name three colours."}]}
    body |= {"max_tokens": max_tokens, "temperature": 0}
    t0, refused = time.perf_counter(), 0
    while time.perf_counter() - t0 < budget:
        try:
            r = httpx.post(
                url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60
            )
        except httpx.HTTPError:  # reset at the cap while the server lingers: retry like a 503
            refused += 1
            time.sleep(1)
            continue
        if r.status_code == 503:
            refused += 1
            time.sleep(float(r.headers.get("retry-after", "1")))
            continue
        r.raise_for_status()
        assert r.json()["usage"]["completion_tokens"] >= 1
        return time.perf_counter() - t0, refused
    raise SystemExit(f"no completion within {budget} s during the storm")


async def trickler(
    port: int, key: str | None, trickle: float, until: float, outcomes: Counter[str], reconnect: bool
) -> None:
    await trickle_once(port, key, trickle, until, outcomes)
    while reconnect and time.monotonic() < until:  # a sustained storm: each socket comes back
        await trickle_once(port, key, trickle, until, outcomes)


async def trickle_once(port: int, key: str | None, trickle: float, until: float, outcomes: Counter[str]) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as e:
        outcomes[f"connect failed ({e.__class__.__name__})"] += 1
        await asyncio.sleep(trickle)
        return
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 100000\r\n\r\n{{"
    outcome = "still open at the end"
    try:
        writer.write(head.encode())
        while time.monotonic() < until:
            try:
                line = await asyncio.wait_for(reader.readline(), timeout=trickle)
            except TimeoutError:
                writer.write(b" ")
                await writer.drain()
                continue
            outcome = line[9:12].decode() if line.startswith(b"HTTP/1.1 ") else "closed without an answer"
            break
    except OSError:
        outcome = "reset"
    finally:
        writer.close()
    outcomes[f"{'with' if key else 'without'} key: {outcome}"] += 1


async def storm(args: argparse.Namespace, port: int, key: str, url: str) -> tuple[Counter[str], float, int, float]:
    outcomes: Counter[str] = Counter()
    until = time.monotonic() + args.storm_seconds
    tasks = [
        asyncio.create_task(trickler(port, key if i % 2 else None, args.trickle, until, outcomes, args.reconnect))
        for i in range(args.sockets)
    ]
    await asyncio.sleep(min(2.0, args.storm_seconds / 4))  # let the storm build up
    connect = await asyncio.to_thread(connect_time, port)
    during, refused = await asyncio.to_thread(completion, url, key, args.max_tokens)
    await asyncio.gather(*tasks)
    return outcomes, during, refused, connect


def connect_time(port: int) -> float:
    """Seconds until the kernel completes one TCP handshake (the server's accept queue has room)."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=120):
        return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model to serve (default: the bundled Gemma 3 270M)")
    p.add_argument("--sockets", type=int, default=2000)
    p.add_argument("--storm-seconds", type=float, default=30.0)
    p.add_argument("--trickle", type=float, default=1.0, help="seconds between two body bytes")
    p.add_argument("--body-timeout", type=float, default=5.0)
    p.add_argument("--max-connections", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--settle", type=float, default=3.0, help="seconds between the storm's end and 'after'")
    p.add_argument("--reconnect", action="store_true", help="each socket reconnects when answered, until the end")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, args.sockets + 256)), hard))

    port, key = free_port(), secrets.token_hex(16)
    url = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkdtemp()) / "server.log"
    server = start_server(args, port, key, log)
    try:
        completion(url, key, args.max_tokens)  # warm
        before = [completion(url, key, args.max_tokens)[0] for _ in range(args.repeats)]
        t0 = time.perf_counter()
        outcomes, during, during_503, connect = asyncio.run(storm(args, port, key, url))
        storm_wall = time.perf_counter() - t0
        time.sleep(args.settle)  # "after": once the server has closed what the storm left behind
        after = [completion(url, key, args.max_tokens)[0] for _ in range(args.repeats)]
        health = httpx.get(url + "/health").json()
    finally:
        server.terminate()
        server.wait(30)
    lines = log.read_text().splitlines()
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs ({platform.system()})",
        "model": args.model or "bundled gemma-3-270m q4_k_m",
        "sockets": args.sockets,
        "reconnect": args.reconnect,
        "storm_seconds": args.storm_seconds,
        "storm_wall_s": round(storm_wall, 2),
        "body_timeout_s": args.body_timeout,
        "max_connections": args.max_connections,
        "max_tokens": args.max_tokens,
        "before_s": round(statistics.median(before), 3),
        "during_s": round(during, 3),
        "during_503_retries": during_503,
        "during_tcp_connect_s": round(connect, 3),
        "after_s": round(statistics.median(after), 3),
        "after_over_before": round(statistics.median(after) / statistics.median(before), 3),
        "storm_outcomes": dict(sorted(outcomes.items())),
        "refused_connections": health.get("refused_connections"),
        "server_log_lines": len(lines),
        "server_log_tracebacks": sum("Traceback" in line for line in lines),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()

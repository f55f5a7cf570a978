"""Tokens/s through the HTTP API (OpenAI client, streaming and not) vs the engine directly.

    python benchmarks/api_vs_engine.py [--model PATH] [--max-tokens 128] [--runs 3]

Runs ``lmx.server.serve`` in a child process on 127.0.0.1 (a free port), so the client and
the server do not share a GIL, as with any real client. Greedy decoding: every path makes
the same tokens (a reply may end at EOS before --max-tokens). The table shows the median
end-to-end tokens/s (generated tokens / wall time of the request, prefill included) and the
engine's own decode tokens/s for the same request.
"""

from __future__ import annotations

import lmx  # isort: skip  # loads OpenBLAS before mlx

import argparse
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import httpx
import openai

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


def timed(fn: Callable[[], tuple[int, float]], runs: int) -> tuple[float, float, int]:
    """Median end-to-end tok/s, median server decode tok/s, tokens of the last run."""
    e2e, decode, n = [], [], 0
    for _ in range(runs):
        t0 = time.perf_counter()
        n, dec = fn()
        e2e.append(n / (time.perf_counter() - t0))
        decode.append(dec)
    return statistics.median(e2e), statistics.median(decode), n


SERVER = (
    "import sys\n"
    "from lmx.server import ServerSettings, serve\n"
    "model = sys.argv[2] if sys.argv[2] != '-' else None\n"
    "serve(ServerSettings(model=model, port=int(sys.argv[1]), model_name='bench'))\n"
)


def start_server(model: str | None) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(port), model or "-"])
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF dir or .gguf (default: the bundled Gemma 3 270M)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    engine = lmx.load(args.model)
    n = args.max_tokens
    engine.chat(PROMPT, max_tokens=8)  # warm-up: kernels, caches

    def direct() -> tuple[int, float]:
        c = engine.chat(PROMPT, max_tokens=n)
        return len(c.tokens), c.metrics.decode_tokens_per_s

    def direct_stream() -> tuple[int, float]:
        s = engine.stream_chat(PROMPT, max_tokens=n)
        for _ in s:
            pass
        return len(s.tokens), s.metrics.decode_tokens_per_s

    rows = [("engine.chat", *timed(direct, args.runs)), ("engine.stream_chat", *timed(direct_stream, args.runs))]
    proc, url = start_server(args.model)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0)
        model = "bench"

        def api() -> tuple[int, float]:
            r = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=n)
            return r.usage.completion_tokens, r.model_extra["metrics"]["decode_tokens_per_s"]

        def api_stream() -> tuple[int, float]:
            chunks = list(
                client.chat.completions.create(
                    model=model, messages=PROMPT, max_tokens=n, stream=True, stream_options={"include_usage": True}
                )
            )
            last = chunks[-1]
            return last.usage.completion_tokens, last.model_extra["metrics"]["decode_tokens_per_s"]

        api()  # warm-up through the server
        rows += [
            ("API, non-streaming", *timed(api, args.runs)),
            ("API, streaming (SSE)", *timed(api_stream, args.runs)),
        ]
        client.close()
    finally:
        proc.terminate()
        proc.wait(30)

    info = engine.info()
    print(f"model {info.name} ({info.model_type}, {info.dtype}, {info.device}); {args.runs} runs, median")
    print(f"{'path':<24} {'tokens':>7} {'end-to-end tok/s':>17} {'decode tok/s':>13} {'vs engine':>10}")
    base = rows[0][1]
    for name, e2e, dec, tokens in rows:
        print(f"{name:<24} {tokens:>7} {e2e:>17.1f} {dec:>13.1f} {e2e / base:>9.0%}")
    engine.close()


if __name__ == "__main__":
    main()

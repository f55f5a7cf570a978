"""``lmx serve`` as a real process: it loads the model, serves on the port it was given with the
key it was given, and shuts down cleanly on Ctrl-C."""

from __future__ import annotations

import lmx  # noqa: F401  # isort: skip

import argparse
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from lmx.cli import serve
from lmx.errors import InvalidOptionError

# `lmx serve` once the command is listed in lmx.cli.main.COMMANDS; until then the same module
# through a parser of its own.
HARNESS = (
    "import argparse, sys\n"
    "from lmx.cli import serve\n"
    "p = argparse.ArgumentParser(prog='lmx')\n"
    "serve.register(p.add_subparsers(dest='command', required=True))\n"
    "a = p.parse_args(sys.argv[1:])\n"
    "sys.exit(a.func(a))\n"
)


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lmx")
    serve.register(p.add_subparsers(dest="command", required=True))
    return p.parse_args(["serve", *argv])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_defaults_bind_loopback_8090() -> None:
    args = parse()
    assert (args.host, args.port, args.max_concurrency, args.max_queue) == ("127.0.0.1", 8090, 32, 16)
    assert args.cors_origin == [] and not args.no_lab


def test_bad_values_fail_before_loading() -> None:
    with pytest.raises(InvalidOptionError, match="max_concurrency must be in"):
        serve.run(parse("--model", "/nonexistent", "--max-concurrency", "0"))
    with pytest.raises(InvalidOptionError, match="max_queue"):
        serve.run(parse("--model", "/nonexistent", "--max-queue", "-1"))


@pytest.mark.slow
def test_serve_process(tiny_dirs: dict[str, Path]) -> None:
    port = free_port()
    cmd = [sys.executable, "-c", HARNESS, "serve", "--model", str(tiny_dirs["gemma3"]), "--port", str(port)]
    cmd += ["--api-key", "k3y", "--model-name", "tiny", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        pause = threading.Event()
        for _ in range(600):
            if proc.poll() is not None:
                pytest.fail(f"lmx serve exited with {proc.returncode}: {proc.stderr.read()}")
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pause.wait(0.1)
        else:
            pytest.fail("lmx serve did not answer /health within 60 s")
        assert httpx.get(url + "/v1/models").status_code == 401
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
        r = httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer k3y"})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        page = httpx.get(url + "/")  # the page itself is open: it asks for the key, the API behind it is not
        assert page.status_code == 200 and "<html" in page.text.lower()
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert f"serving on http://127.0.0.1:{port}" in err

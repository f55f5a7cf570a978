"""The ``lmx`` command: generate streams, chat keeps history, info reports, errors are one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

LMX = [sys.executable, "-m", "lmx.cli.main"]


def run(*args: str, stdin: str = "", timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([*LMX, *args], input=stdin, capture_output=True, text=True, timeout=timeout, env=env)


def test_generate_streams_text_and_prints_stats(tiny_dirs):
    import lmx

    out = run("generate", "Hello world", "--model", str(tiny_dirs["gemma3"]), "-n", "12")
    assert out.returncode == 0, out.stderr
    with lmx.load(tiny_dirs["gemma3"]) as engine:
        expected = engine.generate("Hello world", max_tokens=12).text
    assert out.stdout == expected + "\n"
    assert "decode" in out.stderr and "tok/s" in out.stderr


def test_generate_reads_stdin(tiny_dirs):
    out = run("generate", "--model", str(tiny_dirs["qwen3"]), "-n", "4", stdin="from stdin")
    assert out.returncode == 0, out.stderr
    assert "4 generated" in out.stderr


def test_chat_keeps_history_and_resets(tiny_dirs):
    script = "Hello\nAnd again\n/reset\nHello\n/exit\n"
    out = run("chat", "--model", str(tiny_dirs["gemma3"]), "-n", "6", stdin=script)
    assert out.returncode == 0, out.stderr
    assert "(conversation reset)" in out.stderr
    stats = [line for line in out.stderr.splitlines() if "prompt tokens" in line]
    assert len(stats) == 3
    # The second turn carries the first in its prompt; after /reset the prompt is short again.
    sizes = [int(line.split()[0].strip("[")) for line in stats]
    assert sizes[1] > sizes[0] and sizes[2] == sizes[0]


def test_info_reports_device_and_blas(tiny_dirs):
    out = run("info", "--json", "--model", str(tiny_dirs["qwen3"]))
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["device"] in ("cpu", "cuda", "metal")
    if sys.platform.startswith("linux"):
        assert info["blas"]["in_use"] == "openblas"
    assert info["model"]["model_type"] == "qwen3" and info["model"]["num_layers"] == 3
    profile = info["profile"]  # the device profile chosen at load
    assert profile == info["model"]["profile"]
    assert profile["decode_mode"] in ("eager", "segmented") and profile["prefill_step_size"] in (128, 512)
    if info["device"] == "cpu":
        assert (profile["device"], profile["dtype"], profile["prefill_mode"]) == ("cpu", "float32", "whole")
    text = run("info")
    assert text.returncode == 0 and "BLAS:" in text.stdout and "mlx" in text.stdout
    with_model = run("info", "--model", str(tiny_dirs["qwen3"]))
    assert with_model.returncode == 0 and f"ops {profile['ops_backend']}, prefill" in with_model.stdout


def test_errors_are_one_clear_line(tmp_path: Path):
    out = run("generate", "hi", "--model", str(tmp_path / "nope"))
    assert out.returncode == 2
    assert out.stderr.startswith("lmx: error: model") and "not found" in out.stderr
    assert "Traceback" not in out.stderr
    bad = run("generate", "hi", "--model", str(tmp_path), "--top-p", "3")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_a_command_other_than_serve_does_not_import_the_server_app(tiny_dirs):
    """Every command builds ``lmx serve``'s options; only ``serve`` should pay for the app
    (starlette, uvicorn and the routes), and ``lmx bench`` must run where they are missing."""
    code = (
        "import sys\n"
        "for name in ('starlette', 'uvicorn'):\n"
        "    sys.modules[name] = None  # importing either now fails\n"
        "from lmx.cli.main import main\n"
        f"print('generated', main(['generate', 'Hello', '--model', {str(tiny_dirs['gemma3'])!r}, '-n', '3']))\n"
        "print('app imported', 'lmx.server.app' in sys.modules)\n"
        "from lmx.server import create_app  # asked for, it is imported (and fails without starlette)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "generated 0" in out.stdout and "app imported False" in out.stdout, out.stdout + out.stderr
    assert out.returncode == 1 and "No module named 'starlette.applications'" in out.stderr, out.stderr

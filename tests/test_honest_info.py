"""What ``lmx info``, ``lmx chat`` and Ollama's ``/api/tags`` say about a model: its chat template's
origin and, for a GGUF, the quantized blocks that run rather than "float32" (issue 16, part 1)."""

from __future__ import annotations

import lmx  # isort: skip

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from lmx.kernels import status as kernel_status
from lmx.server import BackgroundServer, ServerSettings

pytest_plugins = ["conftest_gguf"]

LMX = [sys.executable, "-m", "lmx.cli.main"]


def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([*LMX, *args], input=stdin, capture_output=True, text=True, timeout=300, env=env)


def test_hf_model_with_its_own_template(engine: lmx.Engine) -> None:
    info = engine.info()
    assert info.chat_template == "model" and info.gguf_types is None
    assert info.runs_as == f"{info.dtype} weights; compute {info.compute_dtype}"


def test_gguf_without_template_says_so(tiny_gguf: dict[str, Path]) -> None:
    with lmx.load(tiny_gguf["qwen3"]) as engine:
        info = engine.info()
    assert info.chat_template == "architecture"
    assert info.gguf_types and sum(info.gguf_types.values()) > 0 and "F32" in info.gguf_types
    out = run("chat", "--model", str(tiny_gguf["qwen3"]), "--once", "Hi", "-n", "2", "--no-stats")
    assert out.returncode == 0, out.stderr
    notes = [line for line in out.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "no chat template of its own" in notes[0]


def test_real_gguf_reports_what_runs(gemma_gguf: Path) -> None:
    if not kernel_status().available:
        pytest.skip("lmx's CPU kernels are not built here: the GGUF runs dequantized")
    with lmx.load(gemma_gguf, device="cpu") as engine:
        info = engine.info()
        assert info.gguf_file_type == "Q4_K_M" and info.chat_template == "architecture"
        assert {"Q4_K", "Q6_K", "Q5_0", "Q8_0", "F32"} <= set(info.gguf_types or {})
        assert info.kernel_types and "Q4_K" in info.kernel_types and "F32" not in info.kernel_types
        assert info.runs_as.startswith("GGUF Q4_K_M blocks on lmx's CPU kernels") and "compute float32" in info.runs_as
        with BackgroundServer(ServerSettings(port=0, warm_up=False), engine) as server:
            tags = httpx.get(server.url + "/api/tags").json()["models"][0]["details"]
        assert tags["quantization_level"] == "Q4_K_M" and tags["format"] == "gguf"
    out = run("info", "--model", str(gemma_gguf))
    assert out.returncode == 0, out.stderr
    assert "runs:     GGUF Q4_K_M blocks" in out.stdout and "no chat template of its own" in out.stdout


def test_info_without_model_describes_the_bundled_one() -> None:
    out = run("info", "--json")
    assert out.returncode == 0, out.stderr
    default = json.loads(out.stdout)["default_model"]
    assert default["name"] == "gemma-3-270m" and "base model" in default["description"]
    text = run("info")
    assert "the bundled default is gemma-3-270m" in text.stdout and "not for chat" in text.stdout

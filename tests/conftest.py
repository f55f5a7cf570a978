"""Shared fixtures: tiny random checkpoints written by transformers (the reference)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import lmx


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One HF directory per architecture: config, safetensors, tokenizer, chat template."""
    from tiny_models import save_tiny

    out = {}
    for arch in ("gemma3", "qwen3"):
        d = tmp_path_factory.mktemp(f"tiny-{arch}")
        save_tiny(arch, d)
        out[arch] = d
    return out


@pytest.fixture(scope="session")
def references(tiny_dirs: dict[str, Path]) -> dict:
    """The transformers models of ``tiny_dirs``, loaded back from disk in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    return {arch: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for arch, d in tiny_dirs.items()}


@pytest.fixture(scope="module")
def engines(tiny_dirs: dict[str, Path]) -> Iterator[dict[str, lmx.Engine]]:
    """One engine per tiny architecture, closed after the test module."""
    out = {arch: lmx.load(d) for arch, d in tiny_dirs.items()}
    yield out
    for engine in out.values():
        engine.close()


@pytest.fixture(scope="module")
def engine(tiny_dirs: dict[str, Path]) -> Iterator[lmx.Engine]:
    """The tiny Gemma 3 engine, closed after the test module (modules needing another override it)."""
    with lmx.load(tiny_dirs["gemma3"]) as engine:
        yield engine


@pytest.fixture(params=["gemma3", "qwen3"])
def arch(request: pytest.FixtureRequest) -> str:
    return request.param

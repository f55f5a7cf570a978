"""What a new user meets first on the command line: ``--version``, defaults in every ``--help``,
one ``--adapter`` flag, and no debug output (issue 16, part 4)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lmx
from lmx.cli.main import HelpFormatter, _shows_default, build_parser

LMX = [sys.executable, "-m", "lmx.cli.main"]


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"lmx {lmx.__version__}"


@pytest.mark.parametrize("command", sorted(_commands()))
def test_every_help_shows_its_defaults(command: str) -> None:
    parser = _commands()[command]
    formatter = HelpFormatter(prog=command)
    for action in parser._actions:
        if not action.option_strings or not _shows_default(action.default) or action.help == argparse.SUPPRESS:
            continue
        shown = formatter._expand_help(action) if action.help else ""
        assert "default" in shown.lower(), f"lmx {command} {action.option_strings[0]}: help {shown!r}"
    text = parser.format_help()
    assert "%(default)" not in text


def test_generate_help_prints_max_tokens_default() -> None:
    assert "default: 256" in _commands()["generate"].format_help()


def test_one_adapter_flag_on_every_model_command() -> None:
    commands = _commands()
    for name in ("generate", "chat", "serve", "classify", "eval", "fuse", "train"):
        assert "--adapter" in commands[name]._option_string_actions, name
    train = commands["train"].parse_args(["--adapter", "out", "--data", "d"])
    assert train.adapter_path == "out"  # --adapter-path stays, as an alias
    assert commands["train"].parse_args(["--adapter-path", "out2", "--data", "d"]).adapter_path == "out2"


def test_serve_applies_its_adapter(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    from lmx.errors import LmxError
    from lmx.server import ServerSettings, create_app

    # lmx serve --adapter used to be parsed and dropped: the server ran the base model
    settings = ServerSettings(model=str(tiny_dirs["qwen3"]), adapters=(str(tmp_path / "no-adapter"),), warm_up=False)
    with pytest.raises(LmxError, match="no-adapter"):
        create_app(settings)


def test_bench_prints_no_debug_lines(tiny_dirs: dict[str, Path]) -> None:
    args = ["bench", "--model", str(tiny_dirs["qwen3"]), "--prompt-tokens", "8", "--gen-tokens", "4", "--repeat", "1"]
    out = subprocess.run([*LMX, *args], capture_output=True, text=True, timeout=300, env={**os.environ})
    assert out.returncode == 0, out.stderr
    assert "decode:" in out.stdout
    assert "run:" not in out.stderr and "BenchRun" not in out.stderr, out.stderr


def test_convert_writes_a_gguf_file(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    done = subprocess.run([*LMX, "convert", str(tiny_dirs["qwen3"]), str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert out.is_file() and out.read_bytes()[:4] == b"GGUF"  # it used to be a directory named out.gguf

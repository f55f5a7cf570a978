"""The settings registry (lmx.runtime.settings): read at call time, typed, strict, the only os.environ reader."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import lmx  # isort: skip  (loads OpenBLAS before mlx)

from lmx.errors import InvalidOptionError
from lmx.runtime import settings
from lmx.runtime.device import choose_device

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "lmx"


def test_readme_table_is_the_registry():
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- settings table:[^\n]*-->\n(.*?)<!-- end of settings table -->", readme, flags=re.S)
    assert found, "README.md has no generated settings table"
    assert found.group(1) == settings.markdown_table()
    for s in settings.SETTINGS:  # every row names its variable, once
        assert found.group(1).count(f"| `{s.name}` |") == 1


def test_every_variable_lmx_names_is_registered():
    """An ``LMX_*`` name in the source that is no setting would be a variable read behind the registry."""
    names = set()
    for path in SRC.rglob("*.py"):
        names |= set(re.findall(r"\bLMX_[A-Z0-9_]+\b", path.read_text()))
    assert names <= {s.name for s in settings.SETTINGS}, names - {s.name for s in settings.SETTINGS}


def test_no_module_outside_runtime_reads_the_environment():
    offenders = [
        str(path.relative_to(SRC))
        for path in SRC.rglob("*.py")
        if "runtime" not in path.relative_to(SRC).parts
        and re.search(r"os\.environ|os\.getenv|getenv\(", path.read_text())
    ]
    assert offenders == []


def test_values_are_read_at_call_time_and_typed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.delenv("LMX_CPU_THREADS", raising=False)
    assert settings.LMX_CPU_THREADS.get() is None
    monkeypatch.setenv("LMX_CPU_THREADS", "3")
    assert settings.LMX_CPU_THREADS.get() == 3
    for text, value in (("0", False), ("off", False), ("No", False), ("1", True), ("ON", True), ("", True)):
        monkeypatch.setenv("LMX_CUDA_ATTENTION", text)
        assert settings.LMX_CUDA_ATTENTION.get() is value
    monkeypatch.setenv("LMX_DEVICE", "CPU")
    assert settings.LMX_DEVICE.get() == "cpu"
    monkeypatch.setenv("LMX_HOME", str(tmp_path / "home"))
    assert settings.LMX_HOME.get() == tmp_path / "home"


def test_home_defaults_under_the_xdg_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.delenv("LMX_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert settings.LMX_HOME.get() == tmp_path / "lmx"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert settings.LMX_HOME.get() == Path.home() / ".cache" / "lmx"


@pytest.mark.parametrize(
    ("name", "text", "allowed"),
    [
        ("LMX_CPU_KERNELS", "maybe", "one of 1/true/on/yes, 0/false/off/no"),
        ("LMX_CPU_THREADS", "two", "an integer >= 1"),
        ("LMX_CPU_THREADS", "0", "an integer >= 1"),
        ("LMX_DEVICE", "tpu", "one of cpu, gpu"),
        ("LMX_BLAS", "mkl", "one of auto, bundled"),
    ],
)
def test_a_bad_value_is_a_typed_error_naming_variable_and_allowed(
    monkeypatch: pytest.MonkeyPatch, name: str, text: str, allowed: str
):
    monkeypatch.setenv(name, text)
    with pytest.raises(InvalidOptionError) as caught:
        settings.setting(name).get()
    assert str(caught.value) == f"{name} must be {allowed}, got {text!r}"


def test_a_bad_device_variable_fails_the_device_choice(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LMX_DEVICE", "tpu")
    with pytest.raises(InvalidOptionError, match="LMX_DEVICE must be one of cpu, gpu, got 'tpu'"):
        choose_device()
    assert choose_device("cpu").type == lmx.runtime.device.mx.cpu  # an argument wins over the variable


def test_unknown_setting_name():
    with pytest.raises(InvalidOptionError, match="no lmx setting is named 'LMX_NOPE'"):
        settings.setting("LMX_NOPE")


def test_info_lists_settings_and_hides_the_api_key(monkeypatch: pytest.MonkeyPatch):
    from lmx.cli.info import collect

    monkeypatch.setenv("LMX_API_KEY", "sk-secret")
    monkeypatch.setenv("LMX_CPU_INT8", "1")
    shown = collect(device="cpu")["settings"]
    assert set(shown) == {s.name for s in settings.SETTINGS}
    assert shown["LMX_API_KEY"] == "(set)" and "sk-secret" not in repr(shown)
    assert shown["LMX_CPU_INT8"] is True
    monkeypatch.delenv("LMX_API_KEY")
    assert collect(device="cpu")["settings"]["LMX_API_KEY"] is None

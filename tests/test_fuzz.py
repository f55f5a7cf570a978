"""Fuzzing of the two header parsers that read untrusted files: safetensors and GGUF.

Whatever the bytes, reading a file may only succeed or raise an :class:`lmx.errors.LmxError`
(never an MLX ``RuntimeError``, a ``struct.error``, a crash or a hang). Each property runs a
fixed number of ``hypothesis`` examples with a per-example deadline; the examples are
derandomized, so a run is repeatable. An ``atheris`` (libFuzzer) run of the same targets
follows when atheris is installed.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lmx  # noqa: F401  # isort: skip  (loads OpenBLAS before mlx.core)
import mlx.core as mx

from lmx.errors import LmxError, WeightsError
from lmx.io.gguf import gguf_config, read_header
from lmx.io.hf import SAFETENSORS_DTYPES, read_safetensors, read_safetensors_header
from lmx.models import GGUF_ARCHITECTURES
from lmx.tokenizer.gguf import tokenizer_from_gguf

# Bounded for CI: a fixed number of examples, each allowed far more time than a parse takes.
FUZZ = settings(
    max_examples=150,
    deadline=timedelta(seconds=5),
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="lmx-fuzz-") as d:
        yield Path(d)


def write(folder: Path, content: bytes, name: str) -> Path:
    path = folder / name
    path.write_bytes(content)
    return path


# ------------------------------------------------------------------------------------- safetensors


def valid_safetensors() -> bytes:
    """A small valid file: three tensors of different dtypes, plus metadata."""
    arrays = {
        "a.weight": mx.arange(12, dtype=mx.float32).reshape(3, 4),
        "b.bias": mx.ones((5,), dtype=mx.bfloat16),
        "c.index": mx.array([1, 2, 3], dtype=mx.int32),
    }
    with tempfile.TemporaryDirectory(prefix="lmx-fuzz-seed-") as d:
        path = Path(d) / "seed.safetensors"
        mx.save_safetensors(str(path), arrays, metadata={"format": "mlx"})
        return path.read_bytes()


SEED = valid_safetensors()


def read_all(path: Path) -> dict[str, mx.array]:
    """Read a safetensors file the way the loader does, and materialise every tensor."""
    weights = read_safetensors([path])
    mx.eval(list(weights.values()))
    return weights


def check_safetensors(path: Path) -> str:
    """Read ``path``; only a typed error may escape. On success the arrays match the header."""
    try:
        weights = read_all(path)
    except LmxError as e:
        assert isinstance(e, WeightsError), repr(e)
        assert str(path) in str(e), str(e)
        return "error"
    header = read_safetensors_header(path)
    assert sorted(weights) == sorted(header)
    for name, entry in header.items():
        assert tuple(weights[name].shape) == entry.shape
    return "ok"


@FUZZ
@given(content=st.binary(max_size=600))
def test_safetensors_arbitrary_bytes(scratch: Path, content: bytes) -> None:
    check_safetensors(write(scratch, content, "bytes.safetensors"))


@FUZZ
@given(
    cut=st.integers(0, len(SEED)),
    flips=st.lists(st.tuples(st.integers(0, len(SEED) - 1), st.integers(0, 255)), max_size=4),
    insert=st.binary(max_size=8),
    at=st.integers(0, len(SEED)),
)
def test_safetensors_damaged_seed(
    scratch: Path, cut: int, flips: list[tuple[int, int]], insert: bytes, at: int
) -> None:
    content = bytearray(SEED)
    for pos, value in flips:
        content[pos] = value
    content[at:at] = insert
    check_safetensors(write(scratch, bytes(content[:cut]), "damaged.safetensors"))


DTYPES = st.sampled_from([*SAFETENSORS_DTYPES, "F64", "F8_E4M3", "C64", "Q4", "", "f32"])
DIMS = st.one_of(
    st.integers(-(2**63), 2**64),
    st.integers(0, 8),
    st.floats(allow_nan=True),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
)
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)


@st.composite
def entries(draw: st.DrawFn) -> Any:
    """A header entry: usually well-formed in type, with values anywhere; sometimes any JSON."""
    if draw(st.integers(0, 9)) == 0:
        return draw(JSONISH)
    shape = draw(st.one_of(st.lists(DIMS, max_size=3), st.lists(st.integers(0, 6), max_size=3), JSONISH))
    offsets = draw(st.one_of(st.lists(st.integers(-8, 300), min_size=2, max_size=2), st.lists(DIMS, max_size=3)))
    entry = {"dtype": draw(DTYPES), "shape": shape, "data_offsets": offsets}
    for key in draw(st.sets(st.sampled_from(list(entry)), max_size=1)):
        del entry[key]
    return entry


@FUZZ
@given(
    header=st.dictionaries(st.text(max_size=6), entries(), max_size=4),
    metadata=st.one_of(st.none(), JSONISH, st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2)),
    data=st.binary(max_size=300),
    length_delta=st.sampled_from([0, 0, 0, -1, 1, 2**40, -(2**20)]),
)
def test_safetensors_structured_headers(
    scratch: Path, header: dict[str, Any], metadata: Any, data: bytes, length_delta: int
) -> None:
    if metadata is not None:
        header = {"__metadata__": metadata, **header}
    hb = json.dumps(header).encode()
    length = max(0, min(2**64 - 1, len(hb) + length_delta))
    content = struct.pack("<Q", length) + hb + data
    check_safetensors(write(scratch, content, "structured.safetensors"))


def test_safetensors_fuzz_reaches_both_outcomes(scratch: Path) -> None:
    """The seed itself loads (so the properties above exercise the success path too)."""
    assert check_safetensors(write(scratch, SEED, "seed.safetensors")) == "ok"
    assert check_safetensors(write(scratch, SEED[:-1], "short.safetensors")) == "error"


# -------------------------------------------------------------------------------------------- GGUF

GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_string(raw: bytes) -> bytes:
    return struct.pack("<Q", len(raw)) + raw


@st.composite
def gguf_values(draw: st.DrawFn) -> bytes:
    """One metadata value (type tag + payload): scalars, strings, arrays, and unknown tags."""
    vtype = draw(st.sampled_from([*GGUF_SCALARS, 8, 9, 13, 255]))
    if vtype in GGUF_SCALARS:
        size = struct.calcsize("<" + GGUF_SCALARS[vtype])
        return struct.pack("<I", vtype) + draw(st.binary(min_size=size, max_size=size))
    if vtype == 8:
        return struct.pack("<I", 8) + gguf_string(draw(st.binary(max_size=12)))
    if vtype == 9:
        etype = draw(st.sampled_from([4, 6, 8, 9, 42]))
        count = draw(st.sampled_from([0, 1, 3, 2**32, 2**62]))
        return struct.pack("<IIQ", 9, etype, count) + draw(st.binary(max_size=40))
    return struct.pack("<I", vtype) + draw(st.binary(max_size=8))


@st.composite
def gguf_files(draw: st.DrawFn) -> bytes:
    keys = draw(
        st.lists(
            st.sampled_from(
                [b"general.architecture", b"general.alignment", b"qwen3.embedding_length", b"tokenizer.ggml.tokens"]
            )
            | st.binary(max_size=10),
            max_size=4,
        )
    )
    kvs = b"".join(gguf_string(k) + draw(gguf_values()) for k in keys)
    tensors = b""
    n_tensors = draw(st.integers(0, 3))
    for _ in range(n_tensors):
        dims = draw(st.lists(st.sampled_from([0, 1, 32, 33, 256, 2**40, 2**63]), max_size=5))
        tensors += gguf_string(draw(st.sampled_from([b"token_embd.weight", b"blk.0.attn_q.weight", b"\xff"])))
        tensors += struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        tensors += struct.pack(
            "<IQ", draw(st.sampled_from([0, 1, 8, 12, 14, 99])), draw(st.sampled_from([0, 32, 2**63]))
        )
    counts = struct.pack(
        "<QQ",
        draw(st.sampled_from([n_tensors, n_tensors, 2**60])),
        draw(st.sampled_from([len(keys), len(keys), len(keys) + 1, 2**40])),
    )
    version = struct.pack("<I", draw(st.sampled_from([3, 3, 2, 1, 3 << 24])))
    body = b"GGUF" + version + counts + kvs + tensors
    return body + b"\0" * (-len(body) % 32) + draw(st.binary(max_size=256))


def check_gguf(path: Path) -> str:
    """Parse the header, then derive the config and the tokenizer: only typed errors may escape."""
    try:
        header = read_header(path)
        config = gguf_config(header, GGUF_ARCHITECTURES)
        tokenizer_from_gguf(header.metadata)
    except LmxError as e:
        assert str(path) in str(e) or "GGUF" in str(e) or "token" in str(e), str(e)
        return "error"
    assert config["model_type"] in ("gemma3_text", "qwen3")
    return "ok"


@FUZZ
@given(content=gguf_files())
def test_gguf_structured_headers(scratch: Path, content: bytes) -> None:
    check_gguf(write(scratch, content, "structured.gguf"))


@FUZZ
@given(content=st.binary(max_size=400))
def test_gguf_arbitrary_bytes_after_the_magic(scratch: Path, content: bytes) -> None:
    check_gguf(write(scratch, b"GGUF" + struct.pack("<I", 3) + content, "bytes.gguf"))


@pytest.fixture(scope="module")
def tiny_gguf_header(scratch: Path) -> tuple[bytes, int]:
    """The tiny qwen3 GGUF of the GGUF tests, and where its tensor data starts."""
    from conftest_gguf import write_tiny_gguf

    path = write_tiny_gguf(scratch / "tiny.gguf", "qwen3", rng=np.random.default_rng(0))
    return path.read_bytes(), read_header(path).data_offset


def test_gguf_damaged_real_header(scratch: Path, tiny_gguf_header: tuple[bytes, int]) -> None:
    content, data_start = tiny_gguf_header
    outcomes: dict[str, int] = {}

    @FUZZ
    @given(
        flips=st.lists(st.tuples(st.integers(0, data_start - 1), st.integers(0, 255)), min_size=1, max_size=4),
        cut=st.one_of(st.none(), st.integers(0, data_start)),
    )
    def damaged(flips: list[tuple[int, int]], cut: int | None) -> None:
        damaged = bytearray(content)
        for pos, value in flips:
            damaged[pos] = value
        outcome = check_gguf(write(scratch, bytes(damaged[:cut]), "damaged.gguf"))
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    damaged()
    assert outcomes.get("error", 0) > 0 and outcomes.get("ok", 0) > 0, outcomes


# ------------------------------------------------------------------------------------------ atheris

ATHERIS_TARGET = """
import sys, tempfile
from pathlib import Path
import atheris
with atheris.instrument_imports():
    import lmx
    from lmx.errors import LmxError
    from lmx.io.gguf import gguf_config, read_header
    from lmx.models import GGUF_ARCHITECTURES
    from lmx.io.hf import read_safetensors
import mlx.core as mx

folder = Path(tempfile.mkdtemp())

def one(data: bytes) -> None:
    kind, body = (data[:1], data[1:]) if data else (b"s", b"")
    try:
        if kind[0] % 2:
            path = folder / "f.gguf"
            path.write_bytes(b"GGUF" + body)
            gguf_config(read_header(path), GGUF_ARCHITECTURES)
        else:
            path = folder / "f.safetensors"
            path.write_bytes(body)
            mx.eval(list(read_safetensors([path]).values()))
    except LmxError:
        pass

# -rss_limit_mb: in one run of the whole suite libFuzzer reported a peak RSS of 2367 MB before the
# first input (its reading, getrusage's peak RSS, was not this target's doing: alone the process
# peaks near 50 MB) and stopped at its default 2048 MB limit. The parsers' memory on hostile
# headers is bounded by the reliability tests; here the limit only has to stay out of the way.
atheris.Setup([sys.argv[0], "-runs=%d" % int(sys.argv[1]), "-seed=1", "-max_len=512", "-rss_limit_mb=65536"], one)
atheris.Fuzz()
"""


def test_atheris_header_parsers(tmp_path: Path) -> None:
    """libFuzzer-guided inputs for both parsers, a fixed number of runs in a child process."""
    pytest.importorskip("atheris")
    script = tmp_path / "fuzz_headers.py"
    script.write_text(ATHERIS_TARGET)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run(
        [sys.executable, str(script), "1500"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Done 1500 runs" in done.stderr

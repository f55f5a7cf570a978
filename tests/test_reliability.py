"""The bad-input matrix of docs/reliability.md: bad files, configs, tokenizers, prompts and options.

Every case must end in a typed :class:`lmx.errors.LmxError` whose message names the bad
value (the file, the tensor, the key, the option), and the live engine must answer exactly
as before afterwards. The tiny checkpoints of ``tiny_dirs`` are copied and damaged per test.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import lmx  # isort: skip
import mlx.core as mx

from lmx.errors import (
    ConfigError,
    ContextLengthError,
    InvalidOptionError,
    LmxError,
    ModelNotFoundError,
    OutOfMemoryError,
    TokenizerError,
    UnsupportedModelError,
    WeightsError,
)
from lmx.generate.options import GenerationOptions
from lmx.models.base import MAX_LAYERS
from lmx.runtime import memory

PROMPT = "Hello world! How are you"
TARGET = "model.norm.weight"  # a tensor both tiny architectures hold, in float32


@pytest.fixture(scope="module")
def engine(tiny_dirs: dict[str, Path]) -> Iterator[lmx.Engine]:
    """The live engine every case must leave usable (prompt cache off: each check runs in full)."""
    with lmx.load(tiny_dirs["gemma3"], prompt_cache=False) as e:
        yield e


@pytest.fixture(scope="module")
def expected(engine: lmx.Engine) -> list[int]:
    """The greedy tokens of PROMPT before any bad input was sent."""
    return engine.generate(PROMPT, max_tokens=6).tokens


@pytest.fixture
def usable(engine: lmx.Engine, expected: list[int]) -> Callable[[], None]:
    """Assert the live engine still generates exactly what it did before."""

    def check() -> None:
        assert engine.generate(PROMPT, max_tokens=6).tokens == expected

    return check


def copy_model(tiny_dirs: dict[str, Path], tmp_path: Path, arch: str = "qwen3") -> Path:
    out = tmp_path / f"model-{arch}"
    shutil.copytree(tiny_dirs[arch], out)
    return out


# ------------------------------------------------------------------------------------ safetensors


def split(raw: bytes) -> tuple[dict[str, Any], bytes]:
    """A safetensors file's header (as JSON) and data section."""
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join(header: Any, data: bytes, *, header_bytes: bytes | None = None, length: int | None = None) -> bytes:
    """A safetensors file from a header and a data section; any field may be made wrong."""
    hb = json.dumps(header).encode() if header_bytes is None else header_bytes
    return struct.pack("<Q", len(hb) if length is None else length) + hb + data


def with_entry(header: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """``header`` with the TARGET entry's fields changed."""
    out = json.loads(json.dumps(header))
    out[TARGET].update(changes)
    return out


def fill_target(header: dict[str, Any], data: bytes, value: float, count: int | None = None) -> bytes:
    """``data`` with the first ``count`` (default: all) float32 values of TARGET set to ``value``."""
    begin, end = header[TARGET]["data_offsets"]
    values = np.frombuffer(data[begin:end], dtype="<f4").copy()
    values[: values.size if count is None else count] = value
    return data[:begin] + values.tobytes() + data[end:]


def _cases() -> list[tuple[str, Callable[[bytes], bytes], str]]:
    """(id, damage(raw file) -> bytes, message regex) for every single-file safetensors case."""

    def edit(fn: Callable[[dict[str, Any], bytes], bytes]) -> Callable[[bytes], bytes]:
        return lambda raw: fn(*split(raw))

    def dup_name(h: dict[str, Any], d: bytes) -> bytes:
        text = json.dumps(h)
        entry = json.dumps(h[TARGET])
        return join(None, d, header_bytes=(text[:-1] + f', "{TARGET}": {entry}}}').encode())

    def shifted(h: dict[str, Any], d: bytes) -> bytes:
        begin, end = h[TARGET]["data_offsets"]
        return join(with_entry(h, data_offsets=[begin + 10**6, end + 10**6]), d)

    def garbled_json(h: dict[str, Any], d: bytes) -> bytes:
        hb = json.dumps(h).encode()
        return join(None, d, header_bytes=b"{" + b"!" * (len(hb) - 1))

    return [
        ("empty file", lambda raw: b"", r"truncated safetensors file: 0 bytes"),
        ("cut in length prefix", lambda raw: raw[:5], r"truncated safetensors file: 5 bytes"),
        ("cut in header", lambda raw: raw[:40], r"header length \d+ is larger than the 32 bytes"),
        ("cut in data", lambda raw: raw[: len(raw) - 100], r"lie outside the file .*truncated"),
        (
            "header length past the end",
            edit(lambda h, d: join(h, d, length=10**9)),
            r"header length 1000000000 is larger than",
        ),
        ("header length 2**63", edit(lambda h, d: join(h, d, length=2**63)), r"header length \d+ is larger"),
        ("header not JSON", edit(garbled_json), r"header is not valid JSON"),
        (
            "header not UTF-8",
            edit(lambda h, d: join(None, d, header_bytes=b'{"\xff\xfe": 1}')),
            r"header is not valid JSON",
        ),
        ("header is a list", edit(lambda h, d: join([1, 2], d)), r"header must be a JSON object, got list"),
        ("offsets outside the file", edit(shifted), rf"tensor '{TARGET}': data_offsets .* lie outside the file"),
        (
            "offsets shorter than the shape",
            edit(lambda h, d: join(with_entry(h, data_offsets=[0, 4]), d)),
            rf"tensor '{TARGET}' has data_offsets \[0, 4\] \(4 bytes\), but its F32 shape .* needs \d+ bytes",
        ),
        (
            "negative offset",
            edit(lambda h, d: join(with_entry(h, data_offsets=[-4, 0]), d)),
            rf"tensor '{TARGET}' has data_offsets \[-4, 0\]; expected \[begin, end\]",
        ),
        (
            "one offset",
            edit(lambda h, d: join(with_entry(h, data_offsets=[0]), d)),
            rf"tensor '{TARGET}' has data_offsets \[0\]",
        ),
        (
            "unknown dtype",
            edit(lambda h, d: join(with_entry(h, dtype="Q7"), d)),
            rf"tensor '{TARGET}' has dtype 'Q7'; supported: BOOL, U8",
        ),
        (
            "float8 dtype (MLX reads it as bytes)",
            edit(lambda h, d: join(with_entry(h, dtype="F8_E4M3"), d)),
            rf"tensor '{TARGET}' has dtype 'F8_E4M3'",
        ),
        ("float64 dtype", edit(lambda h, d: join(with_entry(h, dtype="F64"), d)), rf"'{TARGET}' has dtype 'F64'"),
        ("no dtype", edit(lambda h, d: join(with_entry(h, dtype=None), d)), rf"'{TARGET}' has dtype None"),
        # MLX itself accepts the next four and builds a (-8, -8) array or a wrapped-around shape.
        (
            "negative shape",
            edit(lambda h, d: join(with_entry(h, shape=[-8, -8]), d)),
            rf"tensor '{TARGET}' has shape \[-8, -8\]; expected a list of integers",
        ),
        (
            "fractional shape",
            edit(lambda h, d: join(with_entry(h, shape=[64.0]), d)),
            rf"'{TARGET}' has shape \[64.0\]",
        ),
        (
            "boolean shape",
            edit(lambda h, d: join(with_entry(h, shape=[True, 64]), d)),
            rf"'{TARGET}' has shape \[True, 64\]",
        ),
        (
            "shape past int32",
            edit(lambda h, d: join(with_entry(h, shape=[2**62 + 16]), d)),
            rf"'{TARGET}' has shape \[4611686018427387920\]",
        ),
        ("shape not a list", edit(lambda h, d: join(with_entry(h, shape="64"), d)), rf"'{TARGET}' has shape '64'"),
        (
            "entry not an object",
            edit(lambda h, d: join({**h, TARGET: [1, 2]}, d)),
            rf"tensor '{TARGET}': entry must be an object",
        ),
        ("name twice in one header", edit(dup_name), rf"header names '{TARGET}' twice"),
        (
            "metadata not strings",
            edit(lambda h, d: join({**h, "__metadata__": {"format": 1}}, d)),
            r"__metadata__ must map strings to strings",
        ),
        (
            "NaN-filled tensor",
            edit(lambda h, d: join(h, fill_target(h, d, math.nan))),
            rf"tensor\(s\) {TARGET} hold NaN or infinite values",
        ),
        (
            "one infinite value",
            edit(lambda h, d: join(h, fill_target(h, d, -math.inf, count=1))),
            rf"tensor\(s\) {TARGET} hold NaN or infinite values",
        ),
        (
            "integer tensor for a float weight",
            edit(lambda h, d: join(with_entry(h, dtype="I32"), d)),
            rf"tensor {TARGET} has dtype int32, expected a floating-point dtype",
        ),
        (
            "shape that does not fit the config",
            edit(lambda h, d: join(with_entry(h, shape=[8, 8]), d)),
            rf"tensor {TARGET} has shape \(8, 8\), expected \(64,\)",
        ),
    ]


CASES = _cases()


@pytest.mark.parametrize(("damage", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_corrupt_safetensors(
    tiny_dirs: dict[str, Path], tmp_path: Path, usable: Callable[[], None], damage: Any, message: str
) -> None:
    model = copy_model(tiny_dirs, tmp_path)
    weights = model / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(WeightsError, match=message) as caught:
        lmx.load(model)
    assert str(model) in str(caught.value)  # the message names the file (or its directory)
    usable()


def test_nan_check_names_every_bad_tensor_and_passes_good_ones() -> None:
    from lmx.io.hf import check_finite

    good = {"a": mx.ones((3,)), "b": mx.zeros((0,)), "q": mx.array([1, 2], dtype=mx.uint32)}
    check_finite(good, "ok")
    bad = {
        **good,
        "n": mx.array([1.0, math.nan]),
        "i": mx.array([-math.inf, 0.0]).astype(mx.bfloat16),
        "h": mx.array([math.inf]).astype(mx.float16),
    }
    with pytest.raises(WeightsError, match=r"src: tensor\(s\) h, i, n hold NaN"):
        check_finite(bad, "src")


def shard(model: Path, extra: dict[str, str] | None = None) -> tuple[Path, Path]:
    """Split the model's weights into two shards plus an index; return both shard paths."""
    weights = mx.load(str(model / "model.safetensors"))
    (model / "model.safetensors").unlink()
    names = sorted(weights)
    first, second = model / "model-00001-of-00002.safetensors", model / "model-00002-of-00002.safetensors"
    mx.save_safetensors(str(first), {k: weights[k] for k in names[: len(names) // 2]})
    mx.save_safetensors(str(second), {k: weights[k] for k in names[len(names) // 2 :]})
    weight_map = {k: (first if i < len(names) // 2 else second).name for i, k in enumerate(names)}
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {**weight_map, **(extra or {})}}))
    return first, second


def test_sharded_model_loads(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    model = copy_model(tiny_dirs, tmp_path)
    shard(model)
    with lmx.load(model) as sharded, lmx.load(tiny_dirs["qwen3"]) as whole:
        assert sharded.generate(PROMPT, max_tokens=4).tokens == whole.generate(PROMPT, max_tokens=4).tokens


def test_duplicate_tensor_across_shards(tiny_dirs: dict[str, Path], tmp_path: Path, usable: Callable) -> None:
    model = copy_model(tiny_dirs, tmp_path)
    first, second = shard(model)
    name, tensor = next(iter(mx.load(str(first)).items()))
    mx.save_safetensors(str(second), {**mx.load(str(second)), name: tensor})
    with pytest.raises(WeightsError, match=rf"{second.name} repeats tensor\(s\) already loaded: {name}"):
        lmx.load(model)
    usable()


def test_shard_index_errors(tiny_dirs: dict[str, Path], tmp_path: Path, usable: Callable) -> None:
    model = copy_model(tiny_dirs, tmp_path)
    shard(model, extra={"lm_head.weight": "model-00003-of-00003.safetensors"})
    with pytest.raises(ModelNotFoundError, match=r"names shards that are missing: .*model-00003-of-00003"):
        lmx.load(model)
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(WeightsError, match=r"index\.json has no 'weight_map' object"):
        lmx.load(model)
    (model / "model.safetensors.index.json").write_text("{oops")
    with pytest.raises(ConfigError, match=r"index\.json is not valid JSON"):
        lmx.load(model)
    usable()


def test_missing_weights_and_files(tiny_dirs: dict[str, Path], tmp_path: Path, usable: Callable) -> None:
    model = copy_model(tiny_dirs, tmp_path)
    weights = mx.load(str(model / "model.safetensors"))
    mx.save_safetensors(str(model / "model.safetensors"), {k: v for k, v in weights.items() if k != TARGET})
    with pytest.raises(WeightsError, match=rf"missing tensor\(s\): {TARGET}"):
        lmx.load(model)
    (model / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match=r"no \*\.safetensors weights in"):
        lmx.load(model)
    (model / "config.json").unlink()
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        lmx.load(model)
    with pytest.raises(ModelNotFoundError, match="not found"):
        lmx.load(tmp_path / "nowhere")
    (tmp_path / "weights.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ModelNotFoundError, match="is a file but not a .gguf"):
        lmx.load(tmp_path / "weights.bin")
    usable()


def test_corrupt_gguf_through_load(tmp_path: Path, usable: Callable) -> None:
    # The GGUF header parser's cases are in test_gguf.py (test_corrupt_headers and the two after it);
    # this one checks that lmx.load passes them on typed, and that the engine is unharmed.
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + struct.pack("<I", 3) + struct.pack("<QQ", 2**60, 0))
    with pytest.raises(WeightsError, match="claims 1152921504606846976 tensors"):
        lmx.load(tmp_path / "bad.gguf")
    usable()


def test_nan_in_a_gguf_tensor(tmp_path: Path, usable: Callable) -> None:
    from conftest_gguf import write_tiny_gguf
    from lmx.io.gguf import read_header

    path = write_tiny_gguf(tmp_path / "tiny.gguf", "qwen3", rng=np.random.default_rng(0))
    info = read_header(path).tensors["output_norm.weight"]
    assert info.ggml_type == 0  # F32
    content = bytearray(path.read_bytes())
    content[info.offset : info.offset + info.nbytes] = np.full(info.n_elements, np.nan, "<f4").tobytes()
    path.write_bytes(bytes(content))
    with pytest.raises(WeightsError, match=rf"{path}: tensor\(s\) model\.norm\.weight hold NaN"):
        lmx.load(path)
    usable()


# -------------------------------------------------------------------------------------- config.json


def write_config(model: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    config = json.loads((model / "config.json").read_text())
    out = change(config)
    (model / "config.json").write_text(json.dumps(config if out is None else out))


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(config: dict[str, Any]) -> None:
        config[key] = value

    return change


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    def change(config: dict[str, Any]) -> None:
        del config[key]

    return change


CONFIG_CASES = [
    ("qwen3", _drop("hidden_size"), ConfigError, r"missing the required key 'hidden_size'"),
    ("qwen3", _drop("model_type"), ConfigError, r"missing the required key 'model_type'"),
    ("qwen3", _set("model_type", "llama4"), UnsupportedModelError, r"'llama4' is not supported; supported: gemma3"),
    ("qwen3", _set("model_type", ["qwen3"]), ConfigError, r"'model_type' must be a string .*got \['qwen3'\]"),
    ("qwen3", _set("hidden_size", "64"), ConfigError, r"'hidden_size' must be int, got '64'"),
    ("qwen3", _set("hidden_size", 64.5), ConfigError, r"'hidden_size' must be int, got 64.5"),
    ("qwen3", _set("num_attention_heads", True), ConfigError, r"'num_attention_heads' must be int, got True"),
    ("qwen3", _set("hidden_size", 0), ConfigError, r"'hidden_size' must be > 0, got 0"),
    ("qwen3", _set("num_attention_heads", -4), ConfigError, r"'num_attention_heads' must be > 0, got -4"),
    ("qwen3", _set("vocab_size", 2**40), ConfigError, r"'vocab_size' must be in \[0, 2147483647\]"),
    ("qwen3", _set("num_hidden_layers", 10**9), ConfigError, rf"'num_hidden_layers' must be at most {MAX_LAYERS}"),
    ("qwen3", _set("rms_norm_eps", 0), ConfigError, r"'rms_norm_eps' must be > 0, got 0.0"),
    ("qwen3", _set("rms_norm_eps", math.nan), ConfigError, r"'rms_norm_eps' must be finite, got nan"),
    ("qwen3", _set("layer_types", "full_attention"), ConfigError, r"'layer_types' must be a JSON array"),
    ("qwen3", _set("rope_parameters", [1]), ConfigError, r"'rope_parameters' must be a JSON object"),
    ("qwen3", _set("rope_parameters", {"rope_type": "ntk"}), UnsupportedModelError, r"rope_type 'ntk'"),
    ("qwen3", _set("rope_parameters", {"rope_type": "linear"}), ConfigError, r"RoPE settings .* KeyError: 'factor'"),
    (
        "qwen3",
        _set("rope_parameters", {"rope_type": "linear", "factor": "x"}),
        ConfigError,
        r"RoPE settings .* invalid: ValueError",
    ),
    (
        "qwen3",
        _set("rope_parameters", {"rope_type": "linear", "factor": 0}),
        ConfigError,
        r"RoPE settings .* ZeroDivisionError",
    ),
    ("qwen3", _set("quantization", {"bits": "four"}), ConfigError, r"integer group_size and bits"),
    ("qwen3", lambda c: [c], ConfigError, r"config\.json must hold a JSON object, got list"),
    ("gemma3", _set("layer_types", ["full_attention"]), ConfigError, r"layer_types has 1 entries for 4 layers"),
    ("gemma3", _set("layer_types", ["global"] * 4), ConfigError, r"layer_types holds \['global'\]"),
    ("gemma3", _set("sliding_window", 0), ConfigError, r"'sliding_window' must be > 0, got 0"),
    ("gemma3", _set("query_pre_attn_scalar", -1), ConfigError, r"'query_pre_attn_scalar' must be > 0"),
    (
        "gemma3",
        lambda c: c["rope_parameters"].__setitem__("full_attention", "linear"),
        ConfigError,
        r"rope_parameters\['full_attention'\] must be an object, got 'linear'",
    ),
    (
        "gemma3",
        lambda c: {"model_type": "gemma3", "text_config": "gemma3_text"},
        ConfigError,
        r"'text_config' must be a JSON object",
    ),
]


@pytest.mark.parametrize(
    ("arch", "change", "error", "message"), CONFIG_CASES, ids=[f"{c[0]}-{c[3][:40]}" for c in CONFIG_CASES]
)
def test_bad_config(
    tiny_dirs: dict[str, Path], tmp_path: Path, usable: Callable, arch: str, change: Any, error: type, message: str
) -> None:
    model = copy_model(tiny_dirs, tmp_path, arch)
    write_config(model, change)
    with pytest.raises(error, match=message) as caught:
        lmx.load(model)
    assert f"{model / 'config.json'}:" in str(caught.value) or f"{model / 'config.json'} " in str(caught.value)
    usable()


def test_config_not_json(tiny_dirs: dict[str, Path], tmp_path: Path, usable: Callable) -> None:
    model = copy_model(tiny_dirs, tmp_path)
    (model / "config.json").write_text('{"model_type": "qwen3",')
    with pytest.raises(ConfigError, match=r"config\.json is not valid JSON"):
        lmx.load(model)
    (model / "config.json").write_bytes(b'{"model_type": "\xff"}')
    with pytest.raises(ConfigError, match=r"config\.json is not valid JSON"):
        lmx.load(model)
    for bad in ("{not json", "[1]", json.dumps({"eos_token_id": "eos"})):
        shutil.copy(tiny_dirs["qwen3"] / "config.json", model / "config.json")
        (model / "generation_config.json").write_text(bad)
        with pytest.raises(ConfigError, match=r"generation_config"):
            lmx.load(model)
    usable()


BAD_VALUES = [None, "x", [], {}, -1, 0, 1.5, True, [1], {"a": 1}]


def test_every_config_key_with_every_bad_value_is_typed(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Each key of both tiny configs, set to each bad value or removed: a load either works
    (and then generates) or raises an LmxError; no other exception escapes."""
    outcomes: dict[str, int] = {}
    for arch in ("gemma3", "qwen3"):
        model = copy_model(tiny_dirs, tmp_path, arch)
        base = json.loads((model / "config.json").read_text())
        changes = [{**base, key: value} for key in base for value in BAD_VALUES]
        changes += [{k: v for k, v in base.items() if k != key} for key in base]
        for config in changes:
            (model / "config.json").write_text(json.dumps(config))
            try:
                with lmx.load(model) as e:
                    e.generate([2, 3], max_tokens=2)
                outcome = "ok"
            except LmxError as err:
                outcome = type(err).__name__
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert outcomes.get("ConfigError", 0) > 100 and outcomes.get("ok", 0) > 0, outcomes


# ---------------------------------------------------------------------------------------- tokenizer


def test_malformed_tokenizer_files(tiny_dirs: dict[str, Path], tmp_path: Path, usable: Callable) -> None:
    # More cases on the tokenizer alone: test_tokenizer.py::test_missing_and_malformed_files.
    model = copy_model(tiny_dirs, tmp_path)
    good = (model / "tokenizer.json").read_bytes()
    for bad, message in [
        (good[: len(good) // 2], r"tokenizer\.json is not a valid tokenizers file"),
        (b"[]", r"tokenizer\.json is not a valid tokenizers file"),
        (b"\xff\xfe\x00", r"cannot read .*tokenizer\.json"),
        (b"", r"tokenizer\.json is not a valid tokenizers file"),
    ]:
        (model / "tokenizer.json").write_bytes(bad)
        with pytest.raises(TokenizerError, match=message):
            lmx.load(model)
    (model / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match=r"tokenizer\.json not found"):
        lmx.load(model)
    (model / "tokenizer.json").write_bytes(good)
    for config, message in [
        ("{oops", r"tokenizer_config\.json is not valid JSON"),
        (json.dumps({"eos_token": "<not-a-token>"}), r"eos token '<not-a-token>' .* is not in its vocabulary"),
        (json.dumps({"add_bos_token": "yes"}), r"add_bos_token .* must be true or false, got 'yes'"),
        (json.dumps({"chat_template": 3}), r"chat_template"),
        (json.dumps({"bos_token": {"content": 5}}), r"bos_token .* must be a string"),
    ]:
        (model / "tokenizer_config.json").write_text(config)
        with pytest.raises(TokenizerError, match=message):
            lmx.load(model)
    usable()


def test_every_tokenizer_file_damage_is_typed(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Each tokenizer_config.json key set to each bad value, and tokenizer.json cut at 20 points:
    a load works (and then encodes, generates and chats) or raises an LmxError; nothing else."""
    outcomes: dict[str, int] = {}
    messages = [{"role": "user", "content": "hi"}]

    def attempt(model: Path) -> None:
        try:
            with lmx.load(model) as e:
                e.generate("hello", max_tokens=1)
                e.chat(messages, max_tokens=1)
            outcome = "ok"
        except LmxError as err:
            outcome = type(err).__name__
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    for arch in ("gemma3", "qwen3"):
        model = copy_model(tiny_dirs, tmp_path, arch)
        base = json.loads((model / "tokenizer_config.json").read_text())
        for key in [*base, "eos_token", "unk_token", "additional_special_tokens"]:
            for value in [*BAD_VALUES, {"content": 5}, "<not-a-token>"]:
                (model / "tokenizer_config.json").write_text(json.dumps({**base, key: value}))
                attempt(model)
        (model / "tokenizer_config.json").write_text(json.dumps(base))
        good = (model / "tokenizer.json").read_bytes()
        for cut in range(0, len(good), len(good) // 20):
            (model / "tokenizer.json").write_bytes(good[:cut])
            attempt(model)
    assert outcomes.get("TokenizerError", 0) > 50 and outcomes.get("ok", 0) > 0, outcomes


def test_broken_chat_template_fails_at_chat_only(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    model = copy_model(tiny_dirs, tmp_path)
    messages = [{"role": "user", "content": "hi"}]
    with lmx.load(model) as engine:
        reference = engine.generate(PROMPT, max_tokens=4).tokens
    for template, message in [
        ("{% for m in messages %}", r"template"),
        ("{{ raise_exception('roles must alternate') }}", r"roles must alternate"),
        ("{{ messages[7]['content'] }}", r"template"),
    ]:
        (model / "chat_template.jinja").write_text(template)
        with lmx.load(model) as engine:
            with pytest.raises(TokenizerError, match=message):
                engine.chat(messages, max_tokens=2)
            assert engine.generate(PROMPT, max_tokens=4).tokens == reference


# ------------------------------------------------------------------------------------------ prompts


@pytest.mark.parametrize(
    ("prompt", "error", "message"),
    [
        ([], InvalidOptionError, r"prompt is empty"),
        (None, InvalidOptionError, r"prompt must be a string or a list of token ids, got NoneType"),
        (3.5, InvalidOptionError, r"got float"),
        ({"text": "hi"}, InvalidOptionError, r"got dict"),
        ([1.5, 2], InvalidOptionError, r"got list"),
        ([True, False], InvalidOptionError, r"got list"),
        (np.array([2, 3]), InvalidOptionError, r"got ndarray"),
        (b"\xff\xfe invalid UTF-8", InvalidOptionError, r"got bytes; decode bytes first"),
        (bytearray(b"hello"), InvalidOptionError, r"got bytearray"),
        ("lone surrogate \ud800 here", TokenizerError, r"lone surrogates"),
        (b"bad \xff byte".decode("utf-8", "surrogateescape"), TokenizerError, r"lone surrogates"),
        ([2, 3, 384], InvalidOptionError, r"prompt token ids must be in \[0, 384\), got \[384\]"),
        ([-1], InvalidOptionError, r"got \[-1\]"),
        ([2**70], InvalidOptionError, r"got \[1180591620717411303424\]"),
        ("word " * 600, ContextLengthError, r"prompt has \d+ tokens; the model's context length is 512"),
        ([5] * 512, ContextLengthError, r"prompt has 512 tokens; the model's context length is 512"),
    ],
    ids=lambda v: repr(v)[:30] if not isinstance(v, type) else v.__name__,
)
def test_bad_prompts(engine: lmx.Engine, usable: Callable, prompt: Any, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        engine.generate(prompt, max_tokens=2)
    with pytest.raises(error, match=message):
        engine.stream(prompt, max_tokens=2)  # the call itself raises, before any token
    usable()


def test_empty_text_prompt(tiny_dirs: dict[str, Path], engine: lmx.Engine, usable: Callable) -> None:
    # Gemma's tokenizer adds BOS, so "" is the one-token prompt [BOS]: generation starts from
    # nothing, as with transformers. Qwen 3 adds none, so "" has no tokens and is an error.
    assert engine.tokenizer.encode("") == [engine.tokenizer.bos_token_id]
    assert len(engine.generate("", max_tokens=3).tokens) == 3
    with lmx.load(tiny_dirs["qwen3"]) as qwen, pytest.raises(InvalidOptionError, match="prompt is empty"):
        qwen.generate("")
    usable()


def test_bad_chat_messages(engine: lmx.Engine, usable: Callable) -> None:
    # test_tokenizer.py::test_bad_messages holds the rest of the message-shape cases.
    for messages, message in [
        ("hello", r"messages must be a list"),
        ([{"role": "user"}], r"has no 'content'"),
        ([{"role": "user", "content": "\udc80"}], r"lone surrogates"),
    ]:
        with pytest.raises(TokenizerError, match=message):
            engine.chat(messages, max_tokens=2)
    usable()


def test_control_characters_and_odd_unicode_generate(engine: lmx.Engine, usable: Callable) -> None:
    for prompt in ["\x00\x01\x7f", "\u202e\u200b\ufeff", "🙂" * 50, "\r\n\t", "<bos><eos><start_of_turn>"]:
        result = engine.generate(prompt, max_tokens=2)
        assert len(result.tokens) == 2 and isinstance(result.text, str)
    usable()


def test_max_tokens_is_clamped_at_the_context(engine: lmx.Engine, usable: Callable) -> None:
    for huge in (10**6, 2**63, 10**100):
        result = engine.generate([5] * 500, max_tokens=huge, logit_bias={1: -100.0})
        assert result.finish_reason == "length" and len(result.tokens) == 512 - 500
    last = engine.generate([5] * 511, max_tokens=50)
    assert last.finish_reason == "length" and len(last.tokens) == 1
    usable()


# ------------------------------------------------------------------------------------------ options

FLOAT_BAD = [math.nan, math.inf, -math.inf, "0.5", None, True, [0.5]]
INT_BAD = [math.nan, 1.5, "3", None, True, [3]]
OPTION_CASES: list[tuple[str, Any]] = [
    *[(name, v) for name in ("temperature", "top_p", "min_p", "repetition_penalty") for v in FLOAT_BAD],
    *[(name, v) for name in ("presence_penalty", "frequency_penalty") for v in FLOAT_BAD],
    *[(name, v) for name in ("max_tokens", "top_k", "repetition_context_size") for v in INT_BAD],
    ("temperature", -0.1),
    ("top_p", 0.0),
    ("top_p", 1.01),
    ("min_p", 1.0),
    ("min_p", -0.5),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("presence_penalty", 2.5),
    ("frequency_penalty", -3),
    ("max_tokens", 0),
    ("max_tokens", -1),
    ("top_k", -1),
    ("repetition_context_size", 0),
    ("repetition_context_size", 2**63),
    ("seed", -1),
    ("seed", 2**64),
    ("seed", 1.5),
    ("logprobs", -1),
    ("logprobs", 21),
    ("logprobs", 2.0),
    ("logit_bias", {"abc": 1.0}),
    ("logit_bias", {"-1": 1.0}),
    ("logit_bias", {3: math.nan}),
    ("logit_bias", {3: 101}),
    ("logit_bias", {3: "high"}),
    ("logit_bias", {384: 1.0}),
    ("logit_bias", [3, 4]),
    ("logit_bias", {3: 1.0, "3": 2.0}),
    ("stop", ""),
    ("stop", [""]),
    ("stop", [None]),
    ("stop", 5.5),
    ("stop", [-1]),
    ("stop", [384]),
    ("stop", {"x": 1}),
    ("temprature", 0.5),
    ("max_new_tokens", 5),
]


@pytest.mark.parametrize(("name", "value"), OPTION_CASES, ids=[f"{n}={v!r:.20}" for n, v in OPTION_CASES])
def test_bad_options(engine: lmx.Engine, usable: Callable, name: str, value: Any) -> None:
    with pytest.raises(InvalidOptionError, match=name.split("_")[0]) as caught:
        engine.generate(PROMPT, **{name: value})
    assert isinstance(caught.value, ValueError)
    usable()


def test_extreme_but_valid_options_generate(engine: lmx.Engine, usable: Callable) -> None:
    for options in [
        {"temperature": 1e-30},
        {"temperature": 1e300},
        {"top_k": 10**30, "temperature": 1.0},
        {"top_p": 1e-300, "temperature": 1.0},
        {"min_p": 0.999999, "temperature": 1.0},
        {"repetition_penalty": 1e-30},
        {"repetition_penalty": 1e300, "repetition_context_size": 2**31 - 1},
        {"logit_bias": {i: -100.0 for i in range(384)}, "temperature": 1.0},
        {"seed": 2**64 - 1, "temperature": 1.0},
        {"stop": ["x" * 100_000, *range(300)]},
        {"logprobs": 20},
    ]:
        result = engine.generate(PROMPT, max_tokens=2, **options)
        assert 1 <= len(result.tokens) <= 2 and all(0 <= t < 384 for t in result.tokens), options
    usable()


def test_option_errors_name_the_allowed_range() -> None:
    with pytest.raises(InvalidOptionError, match=r"^top_p must be in \(0, 1\], got 1.5$"):
        GenerationOptions(top_p=1.5)
    with pytest.raises(InvalidOptionError, match=r"^repetition_context_size must be in \[1, 2147483647\]"):
        GenerationOptions(repetition_context_size=2**31)


# ------------------------------------------------------------------------------------------- memory


@pytest.fixture
def limit() -> Iterator[Callable[[int], None]]:
    """Set MLX's memory limit to the bytes now active plus a margin; restore it afterwards."""
    previous = memory.stats().limit

    def set_margin(margin: int) -> None:
        memory.set_limit(memory.active() + margin)

    yield set_margin
    memory.set_limit(previous)


def test_load_beyond_the_memory_limit_is_typed(
    tiny_dirs: dict[str, Path], limit: Callable[[int], None], usable: Callable
) -> None:
    weights = (tiny_dirs["qwen3"] / "model.safetensors").stat().st_size
    limit(weights // 4)
    with pytest.raises(
        OutOfMemoryError, match=r"loading the weights of .* needs [\d.]+ KiB but only [\d.]+ KiB of the"
    ):
        lmx.load(tiny_dirs["qwen3"])
    limit(4 * weights)
    with lmx.load(tiny_dirs["qwen3"]) as loaded:
        assert len(loaded.generate(PROMPT, max_tokens=2).tokens) == 2
    usable()


def test_kv_cache_beyond_the_memory_limit_is_typed(
    tiny_dirs: dict[str, Path], limit: Callable[[int], None], usable: Callable
) -> None:
    with lmx.load(tiny_dirs["gemma3"]) as fresh:  # holds no KV cache yet
        args = fresh.model.args
        windows = [args.sliding_window if t == "sliding_attention" else None for t in args.layer_types]
        n = len(fresh.tokenizer.encode(PROMPT))
        first = memory.kv_cache_bytes(windows, args.num_key_value_heads, args.head_dim, n + 8, 4)
        second = memory.kv_cache_bytes(windows, args.num_key_value_heads, args.head_dim, n + 500, 4)
        # k and v, 2 heads of 16 float32: 2 global layers of 256 positions (512 past the first
        # block) and 2 sliding ones that grow in the same blocks up to window 8 + one 256 block
        blocks = -(-(n + 500) // 256) * 256
        assert (first, second) == (2 * 2 * 16 * 4 * (2 * 256 + 2 * 256), 2 * 2 * 16 * 4 * (2 * blocks + 2 * 264))

        limit(first // 2)  # not even a short request's cache fits: refused before the first token
        with pytest.raises(OutOfMemoryError, match=rf"KV cache for {n + 8} positions .*lower max_tokens"):
            fresh.generate(PROMPT, max_tokens=8)

        # The first block fits, the whole request does not: refused at once, not mid-stream.
        limit((first + second) // 2)
        with pytest.raises(
            OutOfMemoryError,
            match=rf"KV cache for {n + 500} positions needs {memory.format_bytes(second)} but only [\d.]+ KiB of the",
        ):
            fresh.stream(PROMPT, max_tokens=500, logit_bias={1: -100.0})
        assert len(fresh.generate(PROMPT, max_tokens=8).tokens) == 8  # a request that fits still runs

        limit(10 * second)
        assert len(fresh.generate(PROMPT, max_tokens=500, logit_bias={1: -100.0}).tokens) == 500
    usable()


def test_batch_kv_cache_beyond_the_memory_limit_waits(
    tiny_dirs: dict[str, Path], limit: Callable[[int], None], usable: Callable
) -> None:
    with lmx.load(tiny_dirs["gemma3"], prompt_cache=False) as fresh:
        args = fresh.model.args
        windows = [args.sliding_window if t == "sliding_attention" else None for t in args.layer_types]
        n = len(fresh.tokenizer.encode(PROMPT))
        one = memory.kv_cache_bytes(windows, args.num_key_value_heads, args.head_dim, n + 8, 4)
        four = memory.kv_cache_bytes(windows, args.num_key_value_heads, args.head_dim, n + 8, 4, batch=4)
        assert four == 4 * one
        alone = fresh.generate(PROMPT, max_tokens=8).tokens
        limit((one + four) // 2)  # one row's cache fits, four rows' do not: they wait their turn
        assert [c.tokens for c in fresh.batch_generate([PROMPT] * 4, max_tokens=8)] == [alone] * 4
        assert fresh.stats().max_batch_seen < 4
        limit(10 * four)
        assert [c.tokens for c in fresh.batch_generate([PROMPT] * 4, max_tokens=8)] == [alone] * 4
        assert fresh.stats().max_batch_seen == 4
    usable()


def test_set_limit_rejects_bad_values() -> None:
    for bad in (0, -1, 1.5, "1GB", True, None):
        with pytest.raises(InvalidOptionError, match=r"memory limit must be a positive number of bytes"):
            memory.set_limit(bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- HTTP
# Status codes and body shapes of every API error are in tests/test_server_errors.py (malformed
# JSON 422, oversized bodies 413, unknown models and routes 404, bad parameters 400). Here: the
# rows that need more than a status, namely that a path-like model name or static-file path
# opens no file, and that the engine answers exactly as before after a burst of bad requests.

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def server(engine: lmx.Engine) -> Iterator[Any]:
    from lmx.server import BackgroundServer, ServerSettings

    with BackgroundServer(
        ServerSettings(port=0, model_name="tiny", max_body_bytes=4096, strict_model_names=True), engine
    ) as running:
        yield running


@pytest.fixture
def opened() -> Iterator[list[str]]:
    """Paths this process opens or lists while the test runs (Python audit events)."""
    import sys

    seen: list[str] = []
    active = [True]

    def hook(event: str, args: tuple) -> None:
        if active[0] and event in ("open", "os.listdir", "os.scandir") and args and args[0] is not None:
            seen.append(str(args[0]))

    sys.addaudithook(hook)  # a hook cannot be removed; it goes quiet when the test ends
    yield seen
    active[0] = False


def test_path_like_model_names_open_no_file(
    server: Any, tiny_dirs: dict[str, Path], opened: list[str], usable: Callable
) -> None:
    import httpx

    names = [
        "../../../../etc/passwd",
        "/etc/passwd",
        "~/.ssh/id_rsa",
        "file:///etc/hostname",
        "tiny/../../../etc/passwd",
        "..\\..\\windows\\win.ini",
        str(tiny_dirs["qwen3"]),  # a real model directory on this machine: still not served
        str(tiny_dirs["qwen3"] / "model.safetensors"),
    ]
    with httpx.Client(base_url=server.url) as http:
        reference = http.post("/v1/chat/completions", json=CHAT).json()["choices"][0]["message"]["content"]
        opened.clear()
        for name in names:
            for path, body in [
                ("/v1/chat/completions", {**CHAT, "model": name}),
                ("/v1/completions", {"model": name, "prompt": "Hi", "max_tokens": 2}),
                ("/v1/classify", {"model": name, "texts": ["Hi"], "labels": ["a", "b"]}),
                ("/api/chat", {"model": name, "messages": CHAT["messages"]}),
                ("/api/generate", {"model": name, "prompt": "Hi"}),
            ]:
                r = http.post(path, json=body)
                assert r.status_code == 404, (path, name, r.text)
                assert "not served here" in r.text
            assert http.get(f"/v1/models/{name}").status_code == 404
        for path in [
            "/static/../../../../etc/passwd",
            "/static/..%2f..%2f..%2f..%2fetc%2fpasswd",
            "/static/%2e%2e/app.py",
        ]:
            assert http.get(path).status_code == 404, path
        assert http.get("/static/lab.css").status_code == 200  # the hook does see the server's opens:
        assert any(p.endswith("lab.css") for p in opened)
        suspicious = ("passwd", "id_rsa", "hostname", "win.ini", str(tiny_dirs["qwen3"]), "app.py")
        assert [p for p in opened if any(s in p for s in suspicious)] == []
        after = http.post("/v1/chat/completions", json=CHAT).json()["choices"][0]["message"]["content"]
        assert after == reference
    usable()


def test_engine_unchanged_after_a_burst_of_bad_requests(server: Any, usable: Callable) -> None:
    import httpx

    bad: list[tuple[str, dict[str, Any]]] = [
        ("/v1/chat/completions", {"content": b'{"model": "tiny", "messages": ['}),
        ("/v1/chat/completions", {"content": b"\xff\xfe\x00not json"}),
        ("/v1/chat/completions", {"json": {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}}),
        ("/v1/chat/completions", {"json": {**CHAT, "temperature": -1}}),
        ("/v1/chat/completions", {"json": {**CHAT, "max_tokens": 0}}),
        ("/v1/chat/completions", {"json": {**CHAT, "messages": [{"role": "user", "content": "\udc80"}]}}),
        ("/v1/completions", {"json": {"model": "tiny", "prompt": [10**9], "max_tokens": 2}}),
        ("/v1/completions", {"json": {"model": "tiny", "prompt": "fox " * 600, "max_tokens": 2}}),
        ("/api/generate", {"json": {"model": "tiny", "prompt": "x", "options": {"top_p": "nan"}}}),
    ]
    with httpx.Client(base_url=server.url) as http:
        reference = http.post("/v1/chat/completions", json=CHAT).json()
        for path, kwargs in bad:
            if "json" in kwargs:  # httpx refuses a lone surrogate; send the JSON text as Python escapes it
                kwargs = {
                    "content": json.dumps(kwargs["json"]).encode(),
                    "headers": {"Content-Type": "application/json"},
                }
            r = http.post(path, **kwargs)
            assert 400 <= r.status_code < 500, (path, r.status_code, r.text)
            assert "error" in r.json()
        after = http.post("/v1/chat/completions", json=CHAT).json()
        assert after["choices"][0]["message"] == reference["choices"][0]["message"]
    usable()

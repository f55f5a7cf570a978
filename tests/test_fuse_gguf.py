"""``lmx fuse`` of a GGUF base into a GGUF file: untouched tensors keep their blocks byte for byte,
merged matrices carry base + adapter (checked against the gguf package's own dequantizer and an
update computed here from the adapter file), and the fused file loads onto the CPU kernels."""

from __future__ import annotations

import lmx  # noqa: F401  # isort: skip  (loads OpenBLAS before mlx.core)

import json
import subprocess
import sys
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from conftest_gguf import write_tiny_gguf
from lmx.errors import InvalidOptionError
from lmx.loading import load_model
from lmx.train.fuse import fuse
from lmx.train.lora import LoRALinear, apply_lora, save_adapter

PROMPT = mx.array([[1, 40, 41, 42, 43, 44, 45, 46]])


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fuse-gguf")
    return write_tiny_gguf(folder / "tiny-qwen3.gguf", "qwen3", rng=np.random.default_rng(3))


def _adapter(base: Path, out: Path, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Save a random adapter for ``base``; return the (base, adapted) logits of the in-memory model."""
    model = load_model(base, dtype="float32").model
    base_logits = np.array(model(PROMPT))
    config = apply_lora(model, rank=4, alpha=8.0, seed=0)
    rng = np.random.default_rng(seed)
    for _, layer in model.named_modules():
        if isinstance(layer, LoRALinear):
            layer.lora_b = mx.array(rng.normal(0, 0.05, layer.lora_b.shape).astype(np.float32))
    adapted = np.array(model(PROMPT))
    save_adapter(model, out, config)
    return base_logits, adapted


def _dequantized(tensor: gguf.ReaderTensor) -> np.ndarray:
    rows = int(tensor.shape[-1])
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(rows, -1).astype(np.float32)


def test_untouched_tensors_and_metadata_are_copied_exactly(tiny_qwen3, tmp_path):
    _adapter(tiny_qwen3, tmp_path / "ad", seed=1)
    out = fuse(tiny_qwen3, tmp_path / "ad", tmp_path / "fused.gguf")
    assert out.is_file()
    src, dst = gguf.GGUFReader(str(tiny_qwen3)), gguf.GGUFReader(str(out))
    assert [t.name for t in src.tensors] == [t.name for t in dst.tensors]
    fields = lambda r: {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}  # noqa: E731
    assert fields(src) == fields(dst)
    adapted = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    untouched = [t for t in src.tensors if not any(f".{a}." in t.name for a in adapted)]
    assert {t.name for t in untouched} >= {"token_embd.weight", "output.weight", "output_norm.weight"}
    new = {t.name: t for t in dst.tensors}
    for t in untouched:
        assert new[t.name].tensor_type == t.tensor_type, t.name
        assert np.array_equal(np.asarray(new[t.name].data), np.asarray(t.data)), t.name


def test_merged_matrices_hold_base_plus_adapter(tiny_qwen3, tmp_path):
    _adapter(tiny_qwen3, tmp_path / "ad", seed=2)
    out = fuse(tiny_qwen3, tmp_path / "ad", tmp_path / "fused.gguf")
    src = {t.name: t for t in gguf.GGUFReader(str(tiny_qwen3)).tensors}
    dst = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    adapter = mx.load(str(tmp_path / "ad" / "adapters.safetensors"))
    scale = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["alpha"] / 4
    parts = {"attn_q": "self_attn.q_proj", "attn_v": "self_attn.v_proj", "ffn_gate": "mlp.gate_proj"}
    seen_types = set()
    for layer in range(2):
        for part, hf in parts.items():
            name = f"blk.{layer}.{part}.weight"
            a = np.array(adapter[f"model.layers.{layer}.{hf}.lora_a"])
            b = np.array(adapter[f"model.layers.{layer}.{hf}.lora_b"])
            expected = _dequantized(src[name]) + scale * (a @ b).T
            got = _dequantized(dst[name])
            before, after = src[name].tensor_type, dst[name].tensor_type
            seen_types.add((before, after))
            if before == T.F16:  # a float matrix stays float: only F16 rounding
                assert after == T.F16
                np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-3)
            else:  # quantized matrices become Q8_0: within about half a step of each 32-value block (its scale is fp16)
                assert after == T.Q8_0
                blocks = np.abs(expected).reshape(expected.shape[0], -1, 32).max(axis=-1, keepdims=True)
                err = np.abs(got - expected).reshape(blocks.shape[0], -1, 32)
                assert (err <= blocks / 127 * 0.6 + 1e-6).all(), (name, float((err / blocks).max() * 127))
    assert (T.F16, T.F16) in seen_types and any(before not in (T.F16, T.Q8_0) for before, _ in seen_types)


def test_fused_file_loads_on_the_kernels_and_keeps_the_adapter(tiny_qwen3, tmp_path):
    base, adapted = _adapter(tiny_qwen3, tmp_path / "ad", seed=4)
    out = fuse(tiny_qwen3, tmp_path / "ad", tmp_path / "fused.gguf")
    fused = load_model(out, dtype="float32")
    got = np.array(fused.model(PROMPT))
    # Q8_0 rounding of the merged matrices is far smaller than the adapter's effect
    assert np.abs(got - adapted).max() < 0.2 * np.abs(adapted - base).max()
    with_kernels = load_model(out, dtype="float32", cpu_kernels=True)
    if with_kernels.cpu_kernels:  # the kernels are built on this machine: the blocks run as they are
        types = {type(m).__name__ for _, m in with_kernels.model.named_modules()}
        assert "GGUFLinear" in types
        np.testing.assert_allclose(np.array(with_kernels.model(PROMPT)), got, atol=2e-3)


def test_gguf_output_errors(tiny_dirs, tiny_qwen3, tmp_path):
    _adapter(tiny_qwen3, tmp_path / "ad", seed=5)
    with pytest.raises(InvalidOptionError, match="needs a GGUF base"):
        fuse(tiny_dirs["qwen3"], tmp_path / "ad", tmp_path / "x.gguf")
    with pytest.raises(InvalidOptionError, match="do not apply"):
        fuse(tiny_qwen3, tmp_path / "ad", tmp_path / "x.gguf", dequantize=True)
    with pytest.raises(InvalidOptionError, match="base model itself"):
        fuse(tiny_qwen3, tmp_path / "ad", tiny_qwen3, overwrite=True)
    (tmp_path / "taken.gguf").write_bytes(b"keep")
    with pytest.raises(InvalidOptionError, match="already exists"):
        fuse(tiny_qwen3, tmp_path / "ad", tmp_path / "taken.gguf")
    assert (tmp_path / "taken.gguf").read_bytes() == b"keep"
    assert not list(tmp_path.glob("*.tmp-*")) and not (tmp_path / "x.gguf").exists()


def test_cli_fuse_writes_a_gguf_file(tiny_qwen3, tmp_path):
    _adapter(tiny_qwen3, tmp_path / "ad", seed=6)
    out = tmp_path / "cli.gguf"
    cmd = [sys.executable, "-m", "lmx.cli.main", "fuse", "-m", str(tiny_qwen3), "-a", str(tmp_path / "ad"), "-o"]
    done = subprocess.run([*cmd, str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert out.is_file() and gguf.GGUFReader(str(out)).tensors
    assert "Q8_0" in done.stderr  # the re-encoded matrices are named

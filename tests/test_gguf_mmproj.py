"""A GGUF text model with llama.cpp's mmproj file beside it: the vision tower is read from the mmproj
file (written here as llama.cpp's converter writes it: gguf-py's MODEL_ARCH.MMPROJ names, the
projector's RMSNorm stored as 1 + w) and the model answers images as the HF directory does."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import AddedToken

import lmx
from lmx.errors import UnsupportedModelError
from lmx.loading.convert import convert
from test_convert_gguf import gemma_style_tokenizer
from tiny_models import IMAGE_SIZE, IMAGE_SPECIALS, VISION, save_tiny_multimodal


def write_mmproj(ref: torch.nn.Module, out: Path, projector: str = "gemma3") -> None:
    """An mmproj GGUF of ``ref``'s vision tower and projector, as convert_hf_to_gguf.py --mmproj writes it."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, VISION["num_hidden_layers"])
    writer = gguf.GGUFWriter(str(out), "clip")
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type(projector)
    writer.add_vision_image_size(VISION["image_size"])
    writer.add_vision_patch_size(VISION["patch_size"])
    writer.add_vision_embedding_length(VISION["hidden_size"])
    writer.add_vision_feed_forward_length(VISION["intermediate_size"])
    writer.add_vision_block_count(VISION["num_hidden_layers"])
    writer.add_vision_head_count(VISION["num_attention_heads"])
    writer.add_vision_projection_dim(64)
    writer.add_vision_attention_layernorm_eps(1e-6)
    writer.add_vision_image_mean([0.5, 0.5, 0.5])
    writer.add_vision_image_std([0.5, 0.5, 0.5])
    writer.add_vision_use_gelu(True)
    writer.add_vision_projector_scale_factor((VISION["image_size"] // VISION["patch_size"]) // 4)
    for name, t in ref.state_dict().items():
        # the published checkpoints' layout (transformers 4 names), which the converter reads
        name = name.removeprefix("model.")
        if not name.startswith(("vision_tower.", "multi_modal_projector.")):
            continue
        name = name.replace("vision_tower.", "vision_tower.vision_model.", 1).replace("_weight", ".weight")
        data = t.detach().float().numpy()
        if "soft_emb_norm.weight" in name:
            data = data + 1
        base, suffix = name.rsplit(".", 1)
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    src = tmp_path_factory.mktemp("mm-src")
    tok = gemma_style_tokenizer()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in IMAGE_SPECIALS])
    ref = save_tiny_multimodal(src, tokenizer=tok)
    out = tmp_path_factory.mktemp("mm-gguf")
    convert(src, out / "tiny-text.gguf")  # the text model (the vision tower is left out)
    write_mmproj(ref, out / "mmproj-tiny.gguf")
    with lmx.load(src) as hf_engine, lmx.load(out / "tiny-text.gguf") as gguf_engine:
        yield hf_engine, gguf_engine, out


def png(seed: int) -> bytes:
    arr = np.random.RandomState(seed).randint(0, 256, size=(30, 50, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_gguf_with_mmproj_answers_images_as_the_hf_directory(pair):
    hf_engine, gguf_engine, _ = pair
    assert gguf_engine.loaded.image_processor == hf_engine.loaded.image_processor
    assert gguf_engine.loaded.image_processor.height == IMAGE_SIZE
    for seed in (0, 1):
        messages = [
            {
                "role": "user",
                "content": [{"type": "image", "image": png(seed)}, {"type": "text", "text": "Hello world"}],
            }
        ]
        want = hf_engine.chat(messages, max_tokens=10, temperature=0, logprobs=3)
        got = gguf_engine.chat(messages, max_tokens=10, temperature=0, logprobs=3)
        assert got.tokens == want.tokens
        assert got.metrics.prompt_tokens == want.metrics.prompt_tokens
        assert got.logprobs is not None and len(got.logprobs) == 10
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-4)


def test_several_or_unknown_mmproj_files(pair, tmp_path, caplog):
    _, _, out = pair
    text = tmp_path / "text.gguf"
    text.write_bytes((out / "tiny-text.gguf").read_bytes())
    (tmp_path / "mmproj-a.gguf").write_bytes((out / "mmproj-tiny.gguf").read_bytes())
    (tmp_path / "mmproj-b.gguf").write_bytes((out / "mmproj-tiny.gguf").read_bytes())
    with lmx.load(text) as engine:  # which one is meant cannot be told: text only, with a warning
        assert engine.loaded.image_processor is None
    assert "several mmproj files" in caplog.text
    (tmp_path / "mmproj-b.gguf").unlink()
    with lmx.load(text) as engine:  # one: read
        assert engine.loaded.image_processor is not None
    ref_dir = tmp_path / "bad"
    ref_dir.mkdir()
    (ref_dir / "text.gguf").write_bytes(text.read_bytes())
    import gguf

    writer = gguf.GGUFWriter(str(ref_dir / "mmproj-x.gguf"), "clip")
    writer.add_clip_projector_type("qwen2vl_merger")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="qwen2vl_merger"):
        lmx.load(ref_dir / "text.gguf")

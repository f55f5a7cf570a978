"""Gemma 3 with images (vision tower, projector, image blocks) against transformers'
``Gemma3ForConditionalGeneration`` on the same tiny random checkpoint."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import lmx  # noqa: F401  # isort: skip
import mlx.core as mx
from PIL import Image

from lmx.io import hf
from lmx.io.image import ImageProcessor, decode_image
from lmx.models import build_model
from lmx.models.image_prompt import ImagePrompt, image_digest
from tiny_models import IMAGE_SIZE, IMAGE_TOKENS, save_tiny_multimodal


@pytest.fixture(scope="module")
def tiny_mm(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-gemma3-mm")
    ref = save_tiny_multimodal(d)
    return d, ref


def load(path, dtype=mx.float32):
    config = hf.read_json(path / "config.json")
    model = build_model(config)
    hf.apply_weights(model, model.sanitize(hf.read_safetensors(hf.weight_files(path))), str(path), dtype)
    return model


def png(seed: int, size=(45, 37)) -> bytes:
    arr = np.random.RandomState(seed).randint(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def prompt(config, n_images: int) -> tuple[np.ndarray, list[int]]:
    """Token ids with ``n_images`` image blocks (boi, soft tokens, eoi) between text ids."""
    boi, eoi, soft = config["boi_token_index"], config["eoi_token_index"], config["image_token_index"]
    rng = np.random.RandomState(1)
    ids, starts = [2] + rng.randint(10, 300, size=5).tolist(), []
    for _ in range(n_images):
        ids.append(boi)
        starts.append(len(ids))
        ids += [soft] * IMAGE_TOKENS + [eoi] + rng.randint(10, 300, size=4).tolist()
    return np.array([ids]), starts


def pixels(*seeds: int) -> np.ndarray:
    proc = ImageProcessor(height=IMAGE_SIZE, width=IMAGE_SIZE)
    return proc([decode_image(png(s)) for s in seeds])[0]


def ref_logits(ref, ids, pix, soft) -> np.ndarray:
    with torch.no_grad():
        out = ref(
            input_ids=torch.tensor(ids),
            pixel_values=torch.tensor(pix),
            token_type_ids=torch.tensor((ids == soft).astype(np.int64)),
        )
    return out.logits.float().numpy()


def ours(model, ids, pix, starts, chunk: int | None = None) -> np.ndarray:
    features = model.encode_images(mx.array(pix))
    images = ImagePrompt(starts, features, [image_digest(p) for p in pix])
    cache = model.make_cache()
    out, at = [], 0
    chunk = chunk or ids.shape[1]
    while at < ids.shape[1]:
        end = images.chunk_end(at, min(at + chunk, ids.shape[1]))
        logits = model.head(model.hidden_images(mx.array(ids[:, at:end]), cache, images))
        out.append(np.array(logits.astype(mx.float32)))
        at = end
    return np.concatenate(out, axis=1)


def rel_err(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_vision_tower_and_projector_match_reference(tiny_mm):
    path, ref = tiny_mm
    model = load(path)
    pix = pixels(0, 1)
    with torch.no_grad():
        want = ref.model.get_image_features(torch.tensor(pix)).pooler_output.numpy()
    got = np.array(model.encode_images(mx.array(pix)))
    assert got.shape == want.shape == (2, IMAGE_TOKENS, 64)
    assert rel_err(got, want) < 1e-4


@pytest.mark.parametrize("n_images,chunk", [(1, None), (2, None), (2, 11)])
def test_image_prompt_logits_match_reference(tiny_mm, n_images, chunk):
    path, ref = tiny_mm
    model = load(path)
    config = hf.read_json(path / "config.json")
    ids, starts = prompt(config, n_images)
    pix = pixels(*range(n_images))
    want = ref_logits(ref, ids, pix, config["image_token_index"])
    got = ours(model, ids, pix, starts, chunk)
    assert rel_err(got, want) < 1e-4


def test_bidirectional_block_matters(tiny_mm):
    """A causal-only pass over the same embeddings is far from the reference: the test above would catch its loss."""
    path, ref = tiny_mm
    model = load(path)
    config = hf.read_json(path / "config.json")
    ids, starts = prompt(config, 1)
    pix = pixels(0)
    want = ref_logits(ref, ids, pix, config["image_token_index"])
    images = ImagePrompt(starts, model.encode_images(mx.array(pix)), ["x"])
    h = images.embed(model.model.embed(mx.array(ids)), 0)
    cache = model.make_cache()
    for layer, c in zip(model.layers, cache):
        h = layer(h, c, None)
    causal = np.array(model.head(model.model.norm(h)))
    assert rel_err(causal, want) > 1e-2


def test_greedy_tokens_equal_reference(tiny_mm):
    path, ref = tiny_mm
    model = load(path)
    config = hf.read_json(path / "config.json")
    ids, starts = prompt(config, 1)
    pix = pixels(4)
    soft = config["image_token_index"]
    with torch.no_grad():
        out = ref.generate(
            input_ids=torch.tensor(ids),
            pixel_values=torch.tensor(pix),
            token_type_ids=torch.tensor((ids == soft).astype(np.int64)),
            attention_mask=torch.ones_like(torch.tensor(ids)),
            max_new_tokens=12,
            do_sample=False,
        )
    want = out[0, ids.shape[1] :].tolist()
    images = ImagePrompt(starts, model.encode_images(mx.array(pix)), ["x"])
    cache = model.make_cache()
    logits = model.head(model.hidden_images(mx.array(ids), cache, images))[:, -1]
    got = []
    for _ in range(len(want)):
        token = int(mx.argmax(logits, axis=-1).item())
        got.append(token)
        logits = model(mx.array([[token]]), cache)[:, -1]
    assert got == want
    assert len(set(want)) > 1  # not one token repeated


def test_different_images_differ_and_keys_follow_content(tiny_mm):
    path, _ = tiny_mm
    model = load(path)
    config = hf.read_json(path / "config.json")
    ids, starts = prompt(config, 1)
    a, b = pixels(0), pixels(1)
    la, lb = ours(model, ids, a, starts), ours(model, ids, b, starts)
    assert rel_err(la[:, -1], lb[:, -1]) > 1e-3
    ka = ImagePrompt(starts, mx.zeros((1, IMAGE_TOKENS, 1)), [image_digest(a[0])]).cache_ids(ids[0].tolist())
    ka2 = ImagePrompt(starts, mx.zeros((1, IMAGE_TOKENS, 1)), [image_digest(pixels(0)[0])]).cache_ids(ids[0].tolist())
    kb = ImagePrompt(starts, mx.zeros((1, IMAGE_TOKENS, 1)), [image_digest(b[0])]).cache_ids(ids[0].tolist())
    assert ka == ka2 and ka != kb
    assert ka[: starts[0]] == kb[: starts[0]] == ids[0, : starts[0]].tolist()  # text before the image is shared
    assert len(set(ka[starts[0] : starts[0] + IMAGE_TOKENS])) == IMAGE_TOKENS and max(ka) < 2**62


def test_chunks_never_split_a_block():
    images = ImagePrompt([10], mx.zeros((1, 16, 4)), ["d"])
    assert images.chunk_end(0, 8) == 8
    assert images.chunk_end(0, 12) == 10  # stops before the block
    assert images.chunk_end(10, 12) == 26  # a chunk starting at the block takes all of it
    assert images.chunk_end(12, 20) == 26  # resumed inside a block (a cached prefix): to its end
    assert images.chunk_end(0, 40) == 40


def test_bf16_image_prompt_close_to_reference(tiny_mm):
    """The text models' bf16 bounds (test_models.py): within 5e-2, the top token agrees almost everywhere."""
    path, ref = tiny_mm
    model = load(path, mx.bfloat16)
    config = hf.read_json(path / "config.json")
    ids, starts = prompt(config, 1)
    pix = pixels(2)
    with torch.no_grad():
        ref.to(torch.bfloat16)
        out = ref(
            input_ids=torch.tensor(ids),
            pixel_values=torch.tensor(pix).to(torch.bfloat16),
            token_type_ids=torch.tensor((ids == config["image_token_index"]).astype(np.int64)),
        )
        ref.to(torch.float32)
    want = out.logits.float().numpy()
    got = ours(model, ids, pix, starts).astype(np.float32)
    assert rel_err(got, want) < 5e-2
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9

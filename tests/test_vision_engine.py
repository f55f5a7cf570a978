"""engine.chat with image parts on a tiny random Gemma 3 (vision) checkpoint, against transformers'
Gemma3Processor + Gemma3ForConditionalGeneration; the prefix cache keyed by image content."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import lmx
from lmx.errors import ImageError
from tiny_models import GEMMA_MM_TEMPLATE, IMAGE_SIZE, IMAGE_TOKENS, save_tiny_multimodal


@pytest.fixture(scope="module")
def mm(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-gemma3-mm")
    ref = save_tiny_multimodal(d)
    with lmx.load(d) as engine:
        yield d, ref, engine


def png(seed: int, size=(30, 20)) -> bytes:
    arr = np.random.RandomState(seed).randint(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def reference_processor(d):
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(d / "tokenizer.json"),
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )
    images = Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return Gemma3Processor(
        image_processor=images, tokenizer=tok, image_seq_length=IMAGE_TOKENS, chat_template=GEMMA_MM_TEMPLATE
    )


def messages(*parts):
    content = [{"type": "image", "image": p} if isinstance(p, bytes) else {"type": "text", "text": p} for p in parts]
    return [{"role": "user", "content": content}]


def reference_greedy(d, ref, parts, n: int) -> list[int]:
    proc = reference_processor(d)
    hf_parts = [
        {"type": "image", "image": Image.open(io.BytesIO(p))} if isinstance(p, bytes) else {"type": "text", "text": p}
        for p in parts
    ]
    inputs = proc.apply_chat_template(
        [{"role": "user", "content": hf_parts}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        out = ref.generate(**inputs, max_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("parts", [(0, "Hello world"), ("Compare", 1, "and", 2, "please")])
def test_chat_with_images_equals_transformers_greedy(mm, parts):
    d, ref, engine = mm
    parts = tuple(png(p) if isinstance(p, int) else p for p in parts)
    want = reference_greedy(d, ref, parts, 10)
    done = engine.chat(messages(*parts), max_tokens=10, temperature=0, stop=[])
    assert done.tokens == want[: len(done.tokens)]
    assert len(done.tokens) == 10 or done.finish_reason == "stop"
    assert len(set(want)) > 1


def test_prefix_cache_is_keyed_by_image_content(mm):
    _, _, engine = mm
    engine.clear_prefix_cache()
    a, b = png(10), png(11)
    first = engine.chat(messages(a, "What is this?"), max_tokens=6, temperature=0)
    again = engine.chat(messages(a, "What is this?"), max_tokens=6, temperature=0)
    assert again.tokens == first.tokens
    assert again.metrics.cached_tokens >= IMAGE_TOKENS  # the image's block came from the cache
    other = engine.chat(messages(b, "What is this?"), max_tokens=6, temperature=0)
    # only the text before the image may be shared: <bos><start_of_turn>user\n and "\n\n<start_of_image>"
    assert other.metrics.cached_tokens < 12
    alone = engine.chat(messages(b, "What is this?"), max_tokens=6, temperature=0)
    assert other.tokens == alone.tokens
    engine.clear_prefix_cache()
    fresh = engine.chat(messages(b, "What is this?"), max_tokens=6, temperature=0)
    assert fresh.metrics.cached_tokens == 0 and fresh.tokens == other.tokens


def test_each_image_is_encoded_once_across_turns(mm):
    d, ref, engine = mm
    a, b = png(30), png(31)
    misses, hits = engine.image_cache.misses, engine.image_cache.hits
    first = engine.chat(messages(a, "Hello world"), max_tokens=4, temperature=0)
    turn2 = messages(a, "Hello world") + [
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": [{"type": "image", "image": b}, {"type": "text", "text": "and this?"}]},
    ]
    second = engine.chat(turn2, max_tokens=6, temperature=0)
    assert engine.image_cache.misses - misses == 2  # a once, b once
    assert engine.image_cache.hits - hits == 1  # a again in the second turn
    # the kept features are the tower's: the second turn still equals transformers
    proc = reference_processor(d)
    hf_msgs = [
        {
            "role": "user",
            "content": [{"type": "image", "image": Image.open(io.BytesIO(a))}, {"type": "text", "text": "Hello world"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": first.text}]},
        {
            "role": "user",
            "content": [{"type": "image", "image": Image.open(io.BytesIO(b))}, {"type": "text", "text": "and this?"}],
        },
    ]
    inputs = proc.apply_chat_template(
        hf_msgs, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = ref.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert second.tokens == out[0, inputs["input_ids"].shape[1] :].tolist()[: len(second.tokens)]


def test_image_and_text_requests_batch_together(mm):
    d, ref, engine = mm
    import threading

    results = {}
    parts = (png(20), "Hello world")

    def run(name, msgs):
        results[name] = engine.chat(msgs, max_tokens=8, temperature=0)

    threads = [
        threading.Thread(target=run, args=("image", messages(*parts))),
        threading.Thread(target=run, args=("text", [{"role": "user", "content": "Hello there world"}])),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["image"].tokens == reference_greedy(d, ref, parts, 8)[: len(results["image"].tokens)]
    alone = engine.chat([{"role": "user", "content": "Hello there world"}], max_tokens=8, temperature=0)
    assert results["text"].tokens == alone.tokens


def test_bad_images_are_typed_errors(mm):
    _, _, engine = mm
    with pytest.raises(ImageError, match="not an image"):
        engine.chat(messages(b"definitely not a picture", "hi"), max_tokens=2)
    with pytest.raises(ImageError, match="needs 'image'"):
        engine.chat([{"role": "user", "content": [{"type": "image"}]}], max_tokens=2)
    with pytest.raises(ImageError, match="cannot read the image file"):
        engine.chat([{"role": "user", "content": [{"type": "image", "path": "/nonexistent/x.png"}]}], max_tokens=2)


def test_a_text_model_refuses_images(engine):
    with pytest.raises(ImageError, match="reads no images"):
        engine.chat(messages(png(0), "hi"), max_tokens=2)

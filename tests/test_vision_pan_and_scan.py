"""Pan and scan per request (``engine.chat(..., pan_and_scan=...)``) on a tiny random Gemma 3
vision checkpoint, against transformers' ``Gemma3Processor`` with ``do_pan_and_scan=True`` and
``Gemma3ForConditionalGeneration``; the prefix cache never shares soft tokens between a request
with crops and one without; images in tool results reach the prompt."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import lmx
from lmx.errors import InvalidOptionError
from lmx.generate.images import lay_out
from lmx.generate.tools import gemma_messages
from test_vision_engine import reference_processor
from tiny_models import IMAGE_TOKENS, save_tiny_multimodal

QUESTION = "What is this?"


@pytest.fixture(scope="module")
def mm(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-gemma3-mm-pas")
    ref = save_tiny_multimodal(d)
    with lmx.load(d) as engine:
        yield d, ref, engine


def long_png(width: int = 900, height: int = 300, seed: int = 5) -> bytes:
    """A long image (3:1): with the default pan-and-scan settings (crops of at least 256 pixels)
    it gets 3 crops. Blocky, so the PNG stays small."""
    arr = np.random.RandomState(seed).randint(0, 256, size=(10, 30, 3), dtype=np.uint8)
    if height > width:
        arr = arr.transpose(1, 0, 2)
    buf = io.BytesIO()
    Image.fromarray(arr).resize((width, height), Image.NEAREST).save(buf, format="PNG")
    return buf.getvalue()


def messages(image: bytes, text: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


def reference_inputs(d, image: bytes, pan_and_scan: bool) -> dict:
    proc = reference_processor(d)
    hf = [
        {
            "role": "user",
            "content": [{"type": "image", "image": Image.open(io.BytesIO(image))}, {"type": "text", "text": QUESTION}],
        }
    ]
    return proc.apply_chat_template(
        hf,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"do_pan_and_scan": pan_and_scan},
    )


def cropped_layout(engine, image: bytes):
    """What the engine lays out (the same function its chat calls) for ``image`` with pan and scan on."""
    processor = engine.loaded.image_processor
    return lay_out(engine.tokenizer, engine.model, processor, messages(image), model_name="tiny", pan_and_scan=True)


@pytest.mark.parametrize("size", [(900, 300), (300, 900)])
def test_pan_and_scan_equals_transformers(mm, size):
    d, ref, engine = mm
    image = long_png(*size)
    inputs = reference_inputs(d, image, pan_and_scan=True)
    soft = engine.model.args.image_token_index
    assert inputs["pixel_values"].shape[0] == 4  # the image and 3 crops
    # What the engine lays out (the same function its chat calls) is transformers' input exactly.
    layout = cropped_layout(engine, image)
    assert layout.n_crops == [3]
    assert layout.ids == inputs["input_ids"][0].tolist()
    assert np.array_equal(layout.pixels, inputs["pixel_values"].numpy())
    assert layout.ids.count(soft) == 4 * IMAGE_TOKENS
    # ...and the reply is transformers' greedy reply.
    with torch.no_grad():
        out = ref.generate(**inputs, max_new_tokens=8, do_sample=False)
    want = out[0, inputs["input_ids"].shape[1] :].tolist()
    done = engine.chat(messages(image), max_tokens=8, temperature=0, stop=[], pan_and_scan=True)
    assert done.tokens == want
    assert done.metrics.prompt_tokens == inputs["input_ids"].shape[1]


def test_pan_and_scan_off_is_the_default_and_changes_the_image_tokens(mm):
    d, ref, engine = mm
    image = long_png()
    on = engine.chat(messages(image), max_tokens=8, temperature=0, stop=[], pan_and_scan=True)
    off = engine.chat(messages(image), max_tokens=8, temperature=0, stop=[], pan_and_scan=False)
    default = engine.chat(messages(image), max_tokens=8, temperature=0, stop=[])
    assert default.tokens == off.tokens and default.metrics.prompt_tokens == off.metrics.prompt_tokens
    inputs = reference_inputs(d, image, pan_and_scan=False)
    assert inputs["pixel_values"].shape[0] == 1
    assert off.metrics.prompt_tokens == inputs["input_ids"].shape[1]
    # 3 more blocks of soft tokens and the text around them
    assert on.metrics.prompt_tokens - off.metrics.prompt_tokens > 3 * IMAGE_TOKENS
    assert on.tokens != off.tokens
    with torch.no_grad():
        out = ref.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert off.tokens == out[0, inputs["input_ids"].shape[1] :].tolist()


def test_a_square_image_gets_no_crops(mm):
    _, _, engine = mm
    image = long_png(300, 280)
    on = engine.chat(messages(image), max_tokens=4, temperature=0, pan_and_scan=True)
    off = engine.chat(messages(image), max_tokens=4, temperature=0, pan_and_scan=False)
    assert on.metrics.prompt_tokens == off.metrics.prompt_tokens and on.tokens == off.tokens


def test_the_prefix_cache_keeps_crops_and_no_crops_apart(mm):
    _, _, engine = mm
    image = long_png(seed=9)
    layout = cropped_layout(engine, image)
    first_block = layout.starts[0]
    engine.clear_prefix_cache()
    on = engine.chat(messages(image), max_tokens=6, temperature=0, pan_and_scan=True)
    assert on.metrics.cached_tokens == 0
    off = engine.chat(messages(image), max_tokens=6, temperature=0, pan_and_scan=False)
    # only the text before the image may be shared: the crops' prompt differs before its first block
    assert off.metrics.cached_tokens < first_block
    on_again = engine.chat(messages(image), max_tokens=6, temperature=0, pan_and_scan=True)
    assert on_again.metrics.cached_tokens >= layout.starts[-1] + IMAGE_TOKENS  # every block from the cache
    assert on_again.tokens == on.tokens
    off_again = engine.chat(messages(image), max_tokens=6, temperature=0, pan_and_scan=False)
    assert off_again.metrics.cached_tokens > off.metrics.cached_tokens and off_again.tokens == off.tokens
    engine.clear_prefix_cache()
    fresh = engine.chat(messages(image), max_tokens=6, temperature=0, pan_and_scan=False)
    assert fresh.tokens == off.tokens


def test_the_checkpoint_config_is_the_default_and_a_request_overrides_it(mm, tmp_path):
    d, _, engine = mm
    on_dir = tmp_path / "pas-on"
    shutil.copytree(d, on_dir)
    config = json.loads((on_dir / "preprocessor_config.json").read_text())
    (on_dir / "preprocessor_config.json").write_text(json.dumps({**config, "do_pan_and_scan": True}))
    image = long_png()
    want_on = engine.chat(messages(image), max_tokens=6, temperature=0, pan_and_scan=True)
    want_off = engine.chat(messages(image), max_tokens=6, temperature=0, pan_and_scan=False)
    with lmx.load(on_dir) as pas:
        default = pas.chat(messages(image), max_tokens=6, temperature=0)
        off = pas.chat(messages(image), max_tokens=6, temperature=0, pan_and_scan=False)
    assert (default.tokens, default.metrics.prompt_tokens) == (want_on.tokens, want_on.metrics.prompt_tokens)
    assert (off.tokens, off.metrics.prompt_tokens) == (want_off.tokens, want_off.metrics.prompt_tokens)


def test_bad_pan_and_scan_is_a_typed_error(mm):
    _, _, engine = mm
    for value in ("yes", 1):
        with pytest.raises(InvalidOptionError, match="pan_and_scan must be true, false or None"):
            engine.chat(messages(long_png()), max_tokens=2, pan_and_scan=value)
        with pytest.raises(InvalidOptionError, match="pan_and_scan"):  # checked without images too
            engine.chat([{"role": "user", "content": "hi"}], max_tokens=2, pan_and_scan=value)


def test_images_of_tool_results_stay_in_the_gemma_conversation():
    image = {"type": "image", "image": b"png"}
    calls = [{"id": "c1", "type": "function", "function": {"name": "shot", "arguments": "{}"}}]
    conversation = [
        {"role": "user", "content": "Take a screenshot"},
        {"role": "assistant", "content": "", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "done"}, image]},
        {"role": "user", "content": [image, {"type": "text", "text": "and this one?"}]},
    ]
    out = gemma_messages(conversation, None)
    assert out[-1]["role"] == "user"
    assert out[-1]["content"] == [
        {"type": "text", "text": "Result of shot:\n```tool_output\ndone\n```\n\n"},
        image,
        image,
        {"type": "text", "text": "and this one?"},
    ]
    # text-only results keep their text form
    text_only = [*conversation[:2], {"role": "tool", "tool_call_id": "c1", "content": "done"}]
    assert gemma_messages(text_only, None)[-1] == {
        "role": "user",
        "content": "Result of shot:\n```tool_output\ndone\n```",
    }
    followed = [*text_only, {"role": "user", "content": "ok?"}]
    assert gemma_messages(followed, None)[-1]["content"] == "Result of shot:\n```tool_output\ndone\n```\n\nok?"


def test_an_image_in_a_tool_result_reaches_the_model(mm):
    _, _, engine = mm
    calls = [{"id": "c1", "type": "function", "function": {"name": "shot", "arguments": "{}"}}]
    image = long_png(40, 30, seed=2)

    def conversation(result) -> list[dict]:
        return [
            {"role": "user", "content": "Take a screenshot"},
            {"role": "assistant", "content": "", "tool_calls": calls},
            {"role": "tool", "tool_call_id": "c1", "content": result},
        ]

    with_image = engine.chat(
        conversation([{"type": "text", "text": "done"}, {"type": "image", "image": image}]), max_tokens=4, temperature=0
    )
    text_only = engine.chat(conversation("done"), max_tokens=4, temperature=0)
    assert with_image.metrics.prompt_tokens >= text_only.metrics.prompt_tokens + IMAGE_TOKENS

"""Features merged from separate branches, used together: speculative decoding over a quantized
KV cache (rejected drafts are trimmed from quantized storage), images over a quantized KV cache,
and the combinations tensor parallel refuses."""

from __future__ import annotations

import io
from pathlib import Path

import lmx  # isort: skip
import numpy as np
import pytest
from PIL import Image

from lmx.errors import InvalidOptionError
from tiny_models import IMAGE_TOKENS, save_tiny, save_tiny_multimodal

NO_EOS = {1: -100.0, 2: -100.0, 6: -100.0, 106: -100.0}
PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog. Hello world!"


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny models with 64-wide heads (a quantized cache groups 32+ elements of a head)."""
    out = {}
    for arch in ("gemma3", "qwen3"):
        out[arch] = tmp_path_factory.mktemp(f"wide-{arch}")
        save_tiny(arch, out[arch], head_dim=64)
    return out


@pytest.mark.parametrize("name", ["gemma3", "qwen3"])
@pytest.mark.parametrize("bits", [8, 4])
def test_prompt_lookup_over_a_quantized_cache_equals_plain_decoding(wide: dict[str, Path], name, bits) -> None:
    with lmx.load(wide[name], prompt_cache=False, kv_bits=bits) as engine:
        opts = {"max_tokens": 300 if name == "gemma3" else 80, "logit_bias": NO_EOS, "logprobs": 2}
        plain = engine.generate(PROMPT, **opts)
        spec = engine.generate(PROMPT, speculative="prompt-lookup", num_draft_tokens=5, prompt_lookup_ngram=2, **opts)
    assert spec.tokens == plain.tokens
    # A verify pass computes keys for several positions in one product, so float rounding differs
    # from one-at-a-time decoding by ~1e-6, and now and then that moves a value across a
    # quantization step: logprobs agree to about a step's effect (measured: 1.3e-3), not to 1e-4
    # as with float caches; a trim that lost or kept wrong positions would move them by O(1).
    np.testing.assert_allclose(spec.logprobs, plain.logprobs, atol=1e-2, rtol=0)
    # drafts were both accepted and rejected, so quantized storage was trimmed and refilled
    assert spec.metrics.draft_tokens > spec.metrics.accepted_tokens > 0


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def chat(engine: lmx.Engine, image: bytes):
    content = [{"type": "image", "image": image}, {"type": "text", "text": "What is this?"}]
    return engine.chat([{"role": "user", "content": content}], max_tokens=6, temperature=0)


def test_images_over_a_quantized_cache(tmp_path: Path) -> None:
    save_tiny_multimodal(tmp_path, head_dim=64)
    with lmx.load(tmp_path) as plain:
        want = chat(plain, png(1))
    with lmx.load(tmp_path, kv_bits=8) as engine:
        first = chat(engine, png(1))
        assert first.tokens[0] == want.tokens[0]  # 8-bit keys and values keep the top choice here
        again = chat(engine, png(1))
        assert again.tokens == first.tokens and again.metrics.cached_tokens >= IMAGE_TOKENS
        other = chat(engine, png(2))
        assert other.metrics.cached_tokens < 12  # another image: only the text before it is shared


def test_tensor_parallel_refuses_what_it_does_not_split(tiny_dirs: dict[str, Path]) -> None:
    for extra, word in (({"kv_bits": 8}, "kv_bits"), ({"draft_model": str(tiny_dirs["gemma3"])}, "draft_model")):
        with pytest.raises(InvalidOptionError, match=word):
            lmx.load(tiny_dirs["gemma3"], tensor_parallel=2, **extra)

"""Gemma 3 with images: preprocessing, vision-tower encode time, and time to first token for one image.

    python benchmarks/vision.py [--shape gemma3-4b|tiny] [--dtype bfloat16|float32] [--runs 5]
        [--device gpu|cpu] [--json out.json]

Builds the model of ``--shape`` with random weights (``gemma3-4b``: Gemma 3 4B's published config:
the 34-layer text model and the 27-layer SigLIP-400M vision tower at 896 x 896, 256 soft tokens an
image; ``tiny``: a small shape to check that the script runs), then measures, each as the median
of ``--runs``:

* ``preprocess_s``: decoding a 1024 x 768 PNG with Pillow and preprocessing it (resize to the
  tower's input, rescale, normalize: :class:`lmx.io.image.ImageProcessor`);
* ``encode_s``: the vision tower and projector on one image (``encode_images``);
* ``prefill_s``: prefill of a chat prompt holding the image's 256 soft tokens and some text, to the
  first token's logits (``hidden_images``, one chunk);
* ``text_prefill_s``: a text-only prompt of the same length through the text path (for comparison);
* ``ttft_s`` = preprocess + encode + prefill: the time to first token of one image request on an
  idle engine (without the scheduler's few milliseconds of queueing).
"""

from __future__ import annotations

import lmx  # noqa: F401  # isort: skip  (before mlx.core: routes MLX CPU BLAS to OpenBLAS)

import argparse
import io
import json
import platform
import statistics
import time

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from lmx.io.image import ImageProcessor, decode_image
from lmx.models import build_model
from lmx.models.gemma3_text import BENCH_CONFIGS
from lmx.models.image_prompt import ImagePrompt

SHAPES = {
    "gemma3-4b": {
        "text_config": BENCH_CONFIGS["gemma3-4b"],
        "vision_config": {
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_hidden_layers": 27,
            "num_attention_heads": 16,
            "image_size": 896,
            "patch_size": 14,
        },
        "mm_tokens_per_image": 256,
        "image_token_index": 262144,
    },
    "tiny": {
        "text_config": BENCH_CONFIGS["tiny-gemma3"],
        "vision_config": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 64,
            "patch_size": 8,
        },
        "mm_tokens_per_image": 16,
        "image_token_index": 500,
    },
}


def random_model(shape: str, dtype: mx.Dtype):
    config = {"model_type": "gemma3", **SHAPES[shape]}
    model = build_model(config)
    params = []
    for name, p in tree_flatten(model.parameters()):
        if "norm" in name and "layer_norm" not in name and "post_layernorm" not in name:
            w = mx.zeros(p.shape, dtype)  # Gemma's RMSNorm scales by 1 + weight
        elif "norm" in name:
            w = (mx.ones(p.shape) if name.endswith("weight") else mx.zeros(p.shape)).astype(dtype)
        else:
            w = (mx.random.normal(p.shape) * 0.02).astype(dtype)
        mx.eval(w)
        params.append((name, w))
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())
    return model


def median_time(fn, runs: int) -> float:
    fn()  # warm up (kernels, compile caches)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="gemma3-4b")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--device", choices=["gpu", "cpu"], default=None)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--text-tokens", type=int, default=24, help="text tokens around the image")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.device:
        mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    dtype = {"bfloat16": mx.bfloat16, "float32": mx.float32}[args.dtype]

    t0 = time.perf_counter()
    model = random_model(args.shape, dtype)
    build_s = time.perf_counter() - t0
    vision = model.args.vision
    n_soft = model.image_tokens

    rng = np.random.RandomState(0)
    buf = io.BytesIO()
    from PIL import Image

    Image.fromarray(rng.randint(0, 256, size=(768, 1024, 3), dtype=np.uint8)).save(buf, format="PNG")
    data = buf.getvalue()
    processor = ImageProcessor(height=vision.image_size, width=vision.image_size)
    pixels_box: list[np.ndarray] = []

    def preprocess() -> None:
        pixels_box[:] = [processor([decode_image(data)])[0]]

    preprocess_s = median_time(preprocess, args.runs)
    pixels = mx.array(pixels_box[0])

    def encode() -> mx.array:
        features = model.encode_images(pixels)
        mx.eval(features)
        return features

    encode_s = median_time(encode, args.runs)
    features = encode()

    half = args.text_tokens // 2
    a = model.args
    ids = [2] + rng.randint(10, 1000, size=half).tolist() + [a.boi_token_index]
    start = len(ids)
    ids += [a.image_token_index] * n_soft + [a.eoi_token_index] + rng.randint(10, 1000, size=half).tolist()
    tokens = mx.array([ids])
    images = ImagePrompt([start], features, ["bench"])

    def prefill() -> None:
        cache = model.make_cache()
        logits = model.head(model.hidden_images(tokens, cache, images)[:, -1:])
        mx.eval(mx.argmax(logits, axis=-1))

    def text_prefill() -> None:
        cache = model.make_cache()
        text = mx.where(tokens >= a.vocab_size, 0, tokens)
        logits = model.head(model.hidden(text, cache)[:, -1:])
        mx.eval(mx.argmax(logits, axis=-1))

    prefill_s = median_time(prefill, args.runs)
    text_prefill_s = median_time(text_prefill, args.runs)
    result = {
        "shape": args.shape,
        "dtype": args.dtype,
        "device": str(mx.default_device()),
        "machine": platform.machine(),
        "image_size": vision.image_size,
        "soft_tokens": n_soft,
        "prompt_tokens": len(ids),
        "build_s": round(build_s, 3),
        "preprocess_s": round(preprocess_s, 4),
        "encode_s": round(encode_s, 4),
        "prefill_s": round(prefill_s, 4),
        "text_prefill_s": round(text_prefill_s, 4),
        "ttft_s": round(preprocess_s + encode_s + prefill_s, 4),
        "runs": args.runs,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

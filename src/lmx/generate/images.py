"""Image parts of a chat: taking them out of the messages, preprocessing them, and laying out their
soft tokens in the prompt as transformers' ``Gemma3Processor`` does.

A message's ``content`` may be a list of parts. An image part is ``{"type": "image", "image": ...}``
where the value is the encoded file's bytes, or ``{"type": "image", "path": "cat.png"}`` (a local
file: the library's caller is trusted; the server allows paths only under a directory it is told).
The chat template renders each image part as the model's begin-of-image token (Gemma 3's templates
write ``<start_of_image>``); each is then replaced by ``"\\n\\n" + boi + soft * n + eoi + "\\n\\n"``
(with pan and scan, the original image's block and one per crop) before the text is tokenized.

Pan and scan (crops of a long image, each a block of its own) follows the checkpoint's
``preprocessor_config.json`` unless a request says otherwise (``pan_and_scan``: see
:func:`with_pan_and_scan`). :func:`lay_out` is the one place a chat with images becomes token ids
and pixels, for a reply and for counting its tokens alike.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from lmx.errors import ImageError, InvalidOptionError
from lmx.io.image import ImageProcessor, decode_image, read_image_file


@dataclass(frozen=True)
class ImageTokens:
    """A model's image tokens: begin, end, and the soft-token placeholder (as text), and how many
    soft tokens one image (or crop) takes."""

    boi: str
    eoi: str
    soft: str
    soft_id: int
    per_image: int

    def block(self) -> str:
        return f"\n\n{self.boi}{self.soft * self.per_image}{self.eoi}\n\n"

    def expansion(self, n_crops: int) -> str:
        """What one image's begin-of-image token becomes (transformers' ``replace_image_token``)."""
        if not n_crops:
            return self.block()
        crops = " ".join([self.block()] * n_crops)
        return f"Here is the original image {self.block()} and here are some crops to help you see better {crops}"


def has_images(messages: Any) -> bool:
    """Whether any message holds an image part."""
    if not isinstance(messages, list):
        return False
    return any(
        isinstance(m, dict)
        and isinstance(m.get("content"), list)
        and any(isinstance(p, dict) and p.get("type") == "image" for p in m["content"])
        for m in messages
    )


def split_images(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
    """The messages with each image part reduced to ``{"type": "image"}`` (what templates read),
    and the images, decoded to RGB (H, W, 3) uint8, in order.

    Raises:
        ImageError: an image part without an image, or an image that cannot be used.
    """
    out, images = [], []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            out.append(m)
            continue
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "image":
                images.append(_decode(part, len(images)))
                parts.append({"type": "image"})
            else:
                parts.append(part)
        out.append({**m, "content": parts})
    return out, images


def _decode(part: dict[str, Any], index: int) -> np.ndarray:
    if "image" in part:
        data = part["image"]
        if isinstance(data, np.ndarray):
            if data.dtype != np.uint8 or data.ndim != 3 or data.shape[2] != 3 or 0 in data.shape:
                raise ImageError(f"image {index}: an array must be RGB (H, W, 3) uint8, got {data.dtype} {data.shape}")
            return data
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ImageError(f"image {index}: 'image' must be the file's bytes, got {type(data).__name__}")
        return decode_image(bytes(data))
    if "path" in part:
        path = part["path"]
        if not isinstance(path, (str, os.PathLike)):
            raise ImageError(f"image {index}: 'path' must be a file path, got {type(path).__name__}")
        return read_image_file(os.fspath(path))
    raise ImageError(f"image {index}: an image part needs 'image' (the file's bytes) or 'path'")


def expand_prompt(text: str, n_crops: list[int], tokens: ImageTokens) -> str:
    """Replace the ``len(n_crops)`` begin-of-image tokens the template wrote with their blocks.

    Raises:
        ImageError: the template wrote another number of them (it renders no image parts, or the
            text holds the token itself).
    """
    pieces = text.split(tokens.boi)
    if len(pieces) - 1 != len(n_crops):
        raise ImageError(
            f"the chat template wrote {len(pieces) - 1} {tokens.boi} tokens for {len(n_crops)} images; "
            "it must render each image part as one (as Gemma 3's templates do)"
        )
    out = [pieces[0]]
    for crops, rest in zip(n_crops, pieces[1:]):
        out += [tokens.expansion(crops), rest]
    return "".join(out)


def block_starts(ids: list[int], tokens: ImageTokens) -> list[int]:
    """The first position of each run of soft tokens (each ``per_image`` long).

    Raises:
        ImageError: a run of another length (the text held soft tokens of its own).
    """
    starts, i = [], 0
    while i < len(ids):
        if ids[i] != tokens.soft_id:
            i += 1
            continue
        j = i
        while j < len(ids) and ids[j] == tokens.soft_id:
            j += 1
        if j - i != tokens.per_image:
            raise ImageError(
                f"the prompt holds a run of {j - i} {tokens.soft} tokens; each image takes exactly {tokens.per_image}"
            )
        starts.append(i)
        i = j
    return starts


class FeatureCache:
    """The vision tower's output for the last images seen, by content digest: a chat sends its
    earlier turns' images again with every turn, and each is encoded once.

    Args:
        max_entries: the most images kept (one Gemma 3 4B image: 256 x 2560 values).
    """

    def __init__(self, max_entries: int = 32) -> None:
        self.max_entries = max_entries
        self._entries: collections.OrderedDict[str, mx.array] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def features(self, digests: list[str], pixels: np.ndarray, encode: Callable[[np.ndarray], mx.array]) -> mx.array:
        """Soft tokens (n, tokens, hidden) of the images ``pixels`` (n, 3, H, W) whose digests are
        ``digests``: those not kept are encoded (``encode``, one call for all of them)."""
        with self._lock:
            missing = [i for i, d in enumerate(digests) if d not in self._entries]
            self.hits += len(digests) - len(missing)
            self.misses += len(missing)
        found: dict[str, mx.array] = {}
        if missing:
            new = encode(pixels[missing])
            found = {digests[i]: new[j] for j, i in enumerate(missing)}
        with self._lock:
            for d in digests:
                if d in found:
                    self._entries[d] = found[d]
                elif d in self._entries:
                    found[d] = self._entries[d]
                self._entries.move_to_end(d)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return mx.stack([found[d] for d in digests])

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def preprocess(processor: ImageProcessor, images: list[np.ndarray]) -> tuple[np.ndarray, list[int]]:
    """Pixel values (blocks, 3, H, W) of every image and its crops, and each image's crop count."""
    return processor(images)


def check_pan_and_scan(value: Any) -> bool | None:
    """A request's ``pan_and_scan``: True, False, or None (the checkpoint's processor config).

    Raises:
        InvalidOptionError: any other value.
    """
    if value is not None and not isinstance(value, bool):
        raise InvalidOptionError(
            f"pan_and_scan must be true, false or None (the checkpoint's preprocessor_config.json), got {value!r:.40}"
        )
    return value


def with_pan_and_scan(processor: ImageProcessor, pan_and_scan: bool | None) -> ImageProcessor:
    """``processor`` with pan and scan turned on or off for one request (None: as configured).

    Raises:
        InvalidOptionError: ``pan_and_scan`` is not a bool or None.
    """
    if check_pan_and_scan(pan_and_scan) is None or pan_and_scan == processor.do_pan_and_scan:
        return processor
    return dataclasses.replace(processor, do_pan_and_scan=pan_and_scan)


@dataclass(frozen=True)
class ImageLayout:
    """A chat with images, ready for the model.

    Attributes:
        ids: the prompt's token ids, each image (and crop) a block of soft tokens.
        pixels: (blocks, 3, H, W) the vision tower's input, block by block.
        starts: the first position of each block in ``ids``.
        n_crops: each image's number of pan-and-scan crops.
    """

    ids: list[int]
    pixels: np.ndarray
    starts: list[int]
    n_crops: list[int]


def lay_out(
    tokenizer: Any,
    model: Any,
    processor: ImageProcessor | None,
    messages: list[dict[str, Any]],
    *,
    model_name: str,
    tools: Any = None,
    template_kwargs: dict[str, Any] | None = None,
    pan_and_scan: bool | None = None,
) -> ImageLayout:
    """Token ids and pixels of a chat with image parts, rendered for the assistant's turn.

    Args:
        tokenizer: renders the chat template and encodes (:class:`lmx.tokenizer.Tokenizer`).
        model: the loaded model (``encode_images``, ``image_tokens`` and ``args`` with the image
            token ids), or a text model.
        processor: the checkpoint's image processor (None for a text model).
        messages: the conversation (after tool rewriting, as the template gets it).
        model_name: names the model in the error a text model gives.
        tools: the tools the template renders, if any.
        template_kwargs: more chat template variables.
        pan_and_scan: crops of long images for this request (None: as the processor config says).

    Raises:
        ImageError: the model reads no images, or an image cannot be used.
        InvalidOptionError: ``pan_and_scan`` is not a bool or None.
    """
    if processor is None or not hasattr(model, "encode_images"):
        raise ImageError(f"{model_name} reads no images (it has no vision tower); send text only")
    processor = with_pan_and_scan(processor, pan_and_scan)
    template_messages, decoded = split_images(messages)
    pixels, n_crops = processor(decoded)
    args = model.args
    names = [tokenizer.id_to_token(i) for i in (args.boi_token_index, args.eoi_token_index, args.image_token_index)]
    if None in names:
        raise ImageError(f"the tokenizer lacks the model's image tokens (ids {args.boi_token_index}, ...)")
    tokens = ImageTokens(*names, args.image_token_index, model.image_tokens)  # type: ignore[arg-type]
    text = tokenizer.apply_chat_template(
        template_messages, add_generation_prompt=True, tools=tools, **(template_kwargs or {})
    )
    ids = tokenizer.encode(expand_prompt(text, n_crops, tokens), add_special_tokens=False)
    starts = block_starts(ids, tokens)
    if len(starts) != len(pixels):
        raise ImageError(f"the prompt holds {len(starts)} image blocks for {len(pixels)} images and crops")
    return ImageLayout(ids, pixels, starts, n_crops)

"""Image inputs of requests: OpenAI ``image_url`` content parts, Ollama ``images`` and Anthropic
``image`` blocks, turned into the engine's image parts (``{"type": "image", "image": <bytes>}``).

The server never fetches a URL: an OpenAI image is a ``data:`` URL (base64), or, only when the
server was started with ``--allow-local-images DIR``, a local file under ``DIR`` (``file://`` URL or
path); an Anthropic image is a ``base64`` source of one of the four media types Anthropic accepts
(``url`` and ``file`` sources are refused). Decoding the image itself (and its limits) is the
engine's, as for any caller.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from lmx.server.errors import ApiRequestError, UnsupportedParameterError

# Anthropic's image media types, and the first bytes of each format (the data must match its type).
ANTHROPIC_MEDIA_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


def _b64(text: str, param: str) -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiRequestError(f"{param}: the image is not valid base64 ({e})", param=param) from e


def image_url_part(part: dict[str, Any], param: str, image_dir: Path | None) -> dict[str, Any]:
    """An OpenAI ``{"type": "image_url", "image_url": {"url": ...}}`` part as an engine image part.

    Raises:
        ApiRequestError: a malformed part, a remote URL, or a local path the server does not allow.
    """
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str) or not url:
        raise ApiRequestError(f"{param}.image_url.url must be a data: URL string", param=param)
    if url.startswith("data:"):
        header, sep, payload = url[5:].partition(",")
        if not sep or not header.endswith(";base64"):
            raise ApiRequestError(
                f"{param}.image_url.url: a data URL must be base64 (data:image/png;base64,...)", param=param
            )
        return {"type": "image", "image": _b64(payload, f"{param}.image_url.url")}
    scheme = urlparse(url).scheme.lower()
    if scheme in ("http", "https", "ftp") or (scheme and scheme != "file" and len(scheme) > 1):
        raise ApiRequestError(
            f"{param}.image_url.url: this server does not fetch remote images ({scheme}:); send a data: URL",
            param=param,
        )
    if image_dir is None:
        raise ApiRequestError(
            f"{param}.image_url.url: local image paths are off; send a data: URL "
            "(or start the server with --allow-local-images DIR)",
            param=param,
        )
    path = Path(unquote(urlparse(url).path) if scheme == "file" else url)
    resolved = path.resolve() if path.is_absolute() else (image_dir / path).resolve()
    root = image_dir.resolve()
    if resolved != root and root not in resolved.parents:
        raise ApiRequestError(
            f"{param}.image_url.url: {str(path)!r} is outside the allowed image directory", param=param
        )
    return {"type": "image", "path": os.fspath(resolved)}


def ollama_images(images: Any, param: str) -> list[dict[str, Any]]:
    """Ollama's ``images`` (base64 strings) as engine image parts.

    Raises:
        ApiRequestError: not a list of base64 strings.
    """
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise ApiRequestError(f"{param} must be a list of base64 strings", param=param)
    return [{"type": "image", "image": _b64(i, f"{param}[{n}]")} for n, i in enumerate(images)]


def _media_type(data: bytes) -> str | None:
    """The media type of the image format ``data`` starts with (of Anthropic's four), or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((media for magic, media in _SIGNATURES if data.startswith(magic)), None)


def anthropic_image_block(block: dict[str, Any], param: str) -> dict[str, Any]:
    """An Anthropic ``{"type": "image", "source": {"type": "base64", "media_type", "data"}}``
    block as an engine image part.

    Raises:
        UnsupportedParameterError: a ``url`` or ``file`` source (the server fetches nothing).
        ApiRequestError: another source type, a media type outside png/jpeg/gif/webp, data that is
            not base64, or data of another format than its media type says.
    """
    source = block.get("source")
    where = f"{param}.source"
    if not isinstance(source, dict):
        raise ApiRequestError(f"{where} must be an object with type, media_type and data", param=where)
    kind = source.get("type")
    if kind in ("url", "file"):
        why = "this server never fetches image URLs" if kind == "url" else "this server has no Files API"
        raise UnsupportedParameterError(
            f"{where}.type: {why} (source type {kind!r}); send the image as "
            '{"type": "base64", "media_type": ..., "data": ...}',
            param=f"{where}.type",
        )
    if kind != "base64":
        raise ApiRequestError(f"{where}.type must be 'base64', got {kind!r:.40}", param=f"{where}.type")
    media = source.get("media_type")
    if media not in ANTHROPIC_MEDIA_TYPES:
        raise ApiRequestError(
            f"{where}.media_type must be one of {', '.join(ANTHROPIC_MEDIA_TYPES)}, got {media!r:.40}",
            param=f"{where}.media_type",
        )
    text = source.get("data")
    if not isinstance(text, str) or not text:
        raise ApiRequestError(f"{where}.data must be the image as a base64 string", param=f"{where}.data")
    data = _b64(text, f"{where}.data")
    found = _media_type(data)
    if found != media:
        what = f"{found} data" if found else "not a PNG, JPEG, GIF or WebP image"
        raise ApiRequestError(
            f"{where}.data is {what}, but media_type says {media}",
            param=f"{where}.media_type" if found else f"{where}.data",
        )
    return {"type": "image", "image": data}

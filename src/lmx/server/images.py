"""Image inputs of requests: OpenAI ``image_url`` content parts and Ollama ``images``, turned into
the engine's image parts (``{"type": "image", "image": <bytes>}``).

The server never fetches a URL: an OpenAI image is a ``data:`` URL (base64), or, only when the
server was started with ``--allow-local-images DIR``, a local file under ``DIR`` (``file://`` URL or
path). Decoding the image itself (and its limits) is the engine's, as for any caller.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from lmx.server.errors import ApiRequestError


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

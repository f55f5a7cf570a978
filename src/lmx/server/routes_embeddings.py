"""Embedding endpoints: OpenAI's ``POST /v1/embeddings`` and Ollama's ``POST /api/embed`` (and
its older ``POST /api/embeddings``). Vectors come from :func:`lmx.embed.embed`: mean-pooled
final-norm hidden states, L2-normalised (see that module for what they are good for)."""

from __future__ import annotations

import base64
import time
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lmx.embed import Embeddings, embed
from lmx.errors import ContextLengthError, InvalidOptionError
from lmx.server.common import ServerState, endpoint, read_body, server_state
from lmx.server.errors import ApiRequestError, UnsupportedParameterError
from lmx.server.schemas import parse_body


class EmbeddingRequest(BaseModel):
    """``POST /v1/embeddings``."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None  # bookkeeping, as on the completion endpoints


class OllamaEmbedRequest(BaseModel):
    """``POST /api/embed``."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str
    input: str | list[str]
    truncate: bool = True
    dimensions: int | None = None
    options: dict[str, Any] | None = None
    keep_alive: Any = None


class OllamaEmbeddingsRequest(BaseModel):
    """``POST /api/embeddings`` (Ollama's older endpoint: one prompt, one vector)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str
    prompt: str
    options: dict[str, Any] | None = None
    keep_alive: Any = None


def _inputs(value: Any, param: str, limit: int) -> list[Any]:
    """The request's inputs as a list (one text or one id list is a list of one).

    Raises:
        ApiRequestError: no inputs, or more than ``limit``.
    """
    if isinstance(value, str) or (isinstance(value, list) and value and isinstance(value[0], int)):
        return [value]
    if not value:
        raise ApiRequestError(f"{param} must hold at least one text, got an empty list", param=param)
    if len(value) > limit:
        raise ApiRequestError(
            f"{param} may hold at most {limit} inputs (the server's max_embed_inputs), got {len(value)}", param=param
        )
    return list(value)


def _check_dimensions(state: ServerState, dimensions: int | None) -> None:
    size = state.info.hidden_size
    if dimensions is not None and dimensions != size:
        raise UnsupportedParameterError(
            f"dimensions must be the model's hidden size {size} (vectors are not shortened), got {dimensions}",
            param="dimensions",
        )


async def _embed(state: ServerState, inputs: list[Any], *, truncate: bool, param: str = "input") -> Embeddings:
    """Embed ``inputs`` off the event loop (the model is held between two decode steps).

    Raises:
        ApiRequestError: an empty input or ids out of range (``param`` names the field).
        ContextLengthError: an input longer than the context, without ``truncate``.
    """
    try:
        return await run_in_threadpool(embed, state.engine, inputs, truncate=truncate)
    except ContextLengthError as e:
        e.param = param  # type: ignore[attr-defined]  # named in the 400's body
        raise
    except InvalidOptionError as e:
        raise ApiRequestError(str(e), param=param) from None


def _b64(vector: list[float]) -> str:
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()


async def embeddings(request: Request) -> Response:
    """``POST /v1/embeddings``: ``input`` is a text, a list of texts, a list of token ids or a
    list of such lists; ``encoding_format`` ``base64`` sends each vector as little-endian float32."""
    state = server_state(request)
    req = parse_body(EmbeddingRequest, await read_body(request, state.settings.max_body_bytes))
    state.check_model(req.model)
    _check_dimensions(state, req.dimensions)
    inputs = _inputs(req.input, "input", state.settings.max_embed_inputs)
    result = await _embed(state, inputs, truncate=False)
    encode = _b64 if req.encoding_format == "base64" else (lambda v: v)
    data = [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(result.vectors)]
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    return JSONResponse({"object": "list", "data": data, "model": state.model_id, "usage": usage})


async def ollama_embed(request: Request) -> Response:
    """``POST /api/embed``: ``input`` is a text or a list; ``truncate`` (default true) cuts inputs
    longer than the context instead of answering 400."""
    state = server_state(request)
    start = time.perf_counter()
    req = parse_body(OllamaEmbedRequest, await read_body(request, state.settings.max_body_bytes))
    state.check_model(req.model)
    state.keep_alive.note(req.keep_alive)
    _check_dimensions(state, req.dimensions)
    inputs = _inputs(req.input, "input", state.settings.max_embed_inputs)
    result = await _embed(state, inputs, truncate=req.truncate)
    return JSONResponse(
        {
            "model": state.model_id,
            "embeddings": result.vectors,
            "total_duration": int((time.perf_counter() - start) * 1e9),
            "load_duration": 0,
            "prompt_eval_count": result.prompt_tokens,
        }
    )


async def ollama_embeddings(request: Request) -> Response:
    """``POST /api/embeddings``: Ollama's older form, ``{"prompt": text}`` -> ``{"embedding": [...]}``."""
    state = server_state(request)
    req = parse_body(OllamaEmbeddingsRequest, await read_body(request, state.settings.max_body_bytes))
    state.check_model(req.model)
    state.keep_alive.note(req.keep_alive)
    result = await _embed(state, [req.prompt], truncate=True, param="prompt")
    return JSONResponse({"embedding": result.vectors[0]})


def routes() -> list[Route]:
    return [
        Route("/v1/embeddings", endpoint(embeddings), methods=["POST"]),
        Route("/api/embed", endpoint(ollama_embed, ollama=True), methods=["POST"]),
        Route("/api/embeddings", endpoint(ollama_embeddings, ollama=True), methods=["POST"]),
    ]

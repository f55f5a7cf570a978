"""Ollama's model endpoints beyond ``/api/tags``: ``POST /api/show`` (what the served model is)
and ``GET /api/ps`` (what is loaded, and until when per ``keep_alive``)."""

from __future__ import annotations

import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lmx.server.common import ServerState, endpoint, read_body, server_state
from lmx.server.errors import ApiRequestError
from lmx.server.routes_ollama import model_details
from lmx.server.schemas import parse_body


class ShowRequest(BaseModel):
    """``POST /api/show``: ``model`` (``name`` in older clients)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    name: str | None = None
    verbose: bool = False


def _iso(ts: datetime.datetime) -> str:
    return ts.isoformat().replace("+00:00", "Z")


def chat_template_source(state: ServerState) -> str:
    """The Jinja source of the served model's default chat template ("" when it has none)."""
    templates = getattr(state.engine.tokenizer, "chat_templates", None) or {}
    return str(templates.get("default", ""))


def model_info(state: ServerState) -> dict[str, Any]:
    """Ollama's ``model_info``: GGUF-style keys describing the architecture."""
    info = state.info
    arch = info.model_type
    return {
        "general.architecture": arch,
        "general.name": state.model_id,
        "general.parameter_count": info.num_parameters,
        "general.file_type": info.gguf_file_type or info.dtype,
        f"{arch}.context_length": info.context_length,
        f"{arch}.embedding_length": info.hidden_size,
        f"{arch}.block_count": info.num_layers,
        f"{arch}.vocab_size": info.vocab_size,
    }


async def show(request: Request) -> Response:
    """``POST /api/show``: details, parameter count, quantization, context length, and the chat
    template (the model's own Jinja source, not an Ollama Go template; ``lmx.chat_template``
    says where it came from: ``model``, ``architecture`` or ``none``)."""
    state = server_state(request)
    req = parse_body(ShowRequest, await read_body(request, state.settings.max_body_bytes))
    name = req.model or req.name
    if not name:
        raise ApiRequestError("missing required parameter 'model'", param="model")
    state.check_model(name, lookup=True)
    info = state.info
    template = chat_template_source(state)
    modified = datetime.datetime.fromtimestamp(state.created, datetime.timezone.utc)
    return JSONResponse(
        {
            "modelfile": "",
            "parameters": "",
            "template": template,
            "details": model_details(info),
            "model_info": model_info(state),
            "capabilities": ["completion", "embedding"],
            "modified_at": _iso(modified),
            "lmx": {"chat_template": info.chat_template, "has_template": bool(template), "source": info.source},
        }
    )


async def ps(request: Request) -> Response:
    """``GET /api/ps``: the loaded model; ``expires_at`` follows the last ``keep_alive`` a request
    gave (lmx itself keeps the model loaded for the server's life)."""
    state = server_state(request)
    info = state.info
    model = {
        "name": state.model_id,
        "model": state.model_id,
        "size": info.weights_bytes,
        "digest": "",
        "details": model_details(info),
        "expires_at": _iso(state.keep_alive.expires_at()),
        "size_vram": info.weights_bytes if info.device.lower().startswith(("gpu", "cuda", "metal")) else 0,
        "context_length": info.context_length,
    }
    return JSONResponse({"models": [model]})


def routes() -> list[Route]:
    return [
        Route("/api/show", endpoint(show, ollama=True), methods=["POST"]),
        Route("/api/ps", endpoint(ps, ollama=True), methods=["GET"]),
    ]

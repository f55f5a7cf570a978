"""``POST /v1/classify``: :meth:`lmx.Engine.classify` over HTTP (an lmx extension).

Request::

    {"model": "gemma-3-270m", "texts": ["...", "..."], "labels": ["technical", "creative"],
     "examples": [{"text": "...", "label": "technical"}],      # optional few-shot turns
     "instruction": "...",                                      # optional
     "max_text_tokens": 256,                                    # optional: cut every text
     "chat_template_kwargs": {...}}                             # optional, as for chat

Reply::

    {"object": "classification.list", "model": "gemma-3-270m",
     "data": [{"object": "classification", "index": 0, "label": "technical",
               "scores": {"technical": 0.93, "creative": 0.07},
               "logprobs": {"technical": -0.4, "creative": -3.0}, "truncated": false}, ...],
     "usage": {"prompt_tokens": N, "total_tokens": N, "prompt_tokens_details": {"cached_tokens": C}},
     "metrics": {...}}

``scores`` are the label probabilities normalised over the labels (they sum to 1);
``logprobs`` the log-probability of each whole answer before normalising; ``truncated``
says the text was cut to fit the context or ``max_text_tokens``. ``prompt_tokens`` counts
every token the model read for the call (each text with the shared prompt around it);
``cached_tokens`` those of the shared prefix that ran once for all texts.

The call runs on the engine's scheduler as one exclusive job (generation pauses between two
decode steps until every text is scored), on a worker thread so the event loop keeps
serving; ``max_classify_texts`` and ``max_classify_labels`` (server settings) bound how many
texts and labels one request holds.
"""

from __future__ import annotations

import math
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lmx.classify import Classification, validate_labels
from lmx.errors import InvalidOptionError
from lmx.server.common import ServerState, endpoint, read_body, server_state
from lmx.server.errors import ApiRequestError
from lmx.server.schemas import ClassifyRequest, parse_body, template_kwargs

FLOOR_LOGPROB = -9999.0  # JSON has no -Infinity: an answer the model rules out entirely gets this


def _check(req: ClassifyRequest, state: ServerState) -> None:
    """Refuse what the engine would refuse, naming the request field at fault.

    Raises:
        ApiRequestError: too many texts or labels, a blank text, bad labels, an example whose label is
            not a label, or ``max_text_tokens`` < 1.
    """
    limit = state.settings.max_classify_texts
    if len(req.texts) > limit:
        raise ApiRequestError(
            f"texts has {len(req.texts)} entries; this server classifies at most {limit} per request "
            "(max_classify_texts): split them over several requests",
            param="texts",
        )
    limit = state.settings.max_classify_labels
    if len(req.labels) > limit:
        raise ApiRequestError(
            f"labels has {len(req.labels)} entries; this server scores at most {limit} per request "
            "(max_classify_labels)",
            param="labels",
        )
    try:
        validate_labels(req.labels)
    except InvalidOptionError as e:
        raise ApiRequestError(str(e), param="labels") from None
    for i, text in enumerate(req.texts):
        if not text.strip():
            raise ApiRequestError(
                f"texts[{i}] is empty ({text!r:.40}); every text needs visible text", param=f"texts[{i}]"
            )
    for i, ex in enumerate(req.examples or ()):
        if not ex.text.strip():
            raise ApiRequestError(f"examples[{i}].text is empty", param=f"examples[{i}].text")
        if ex.label not in req.labels:
            raise ApiRequestError(
                f"examples[{i}].label {ex.label!r:.80} is not one of the labels {req.labels!r:.200}",
                param=f"examples[{i}].label",
            )
    if req.max_text_tokens is not None and req.max_text_tokens < 1:
        raise ApiRequestError(f"max_text_tokens must be >= 1, got {req.max_text_tokens}", param="max_text_tokens")


def _finite(value: float) -> float:
    return value if math.isfinite(value) else FLOOR_LOGPROB


def _item(index: int, result: Classification) -> dict[str, Any]:
    return {
        "object": "classification",
        "index": index,
        "label": result.label,
        "scores": result.scores,
        "logprobs": {label: _finite(v) for label, v in result.logprobs.items()},
        "truncated": result.truncated,
    }


async def classify(request: Request) -> Response:
    """``POST /v1/classify``."""
    state = server_state(request)
    req = parse_body(ClassifyRequest, await read_body(request, state.settings.max_body_bytes))
    state.check_model(req.model)
    _check(req, state)
    kwargs = template_kwargs(req.chat_template_kwargs, allow_template=state.settings.allow_request_chat_template)
    kwargs = state.template_kwargs(kwargs)
    results: list[Classification] = []
    usage = {"prompt_tokens": 0, "total_tokens": 0, "prompt_tokens_details": {"cached_tokens": 0}}
    metrics: dict[str, Any] = {}
    if req.texts:  # no texts: nothing runs, and the engine's metrics would be another call's
        engine = state.engine
        results = await run_in_threadpool(
            lambda: engine.classify(
                req.texts,
                req.labels,
                instruction=req.instruction,
                examples=[(ex.text, ex.label) for ex in req.examples or ()],
                max_text_tokens=req.max_text_tokens,
                chat_template_kwargs=kwargs,
            )
        )
        # The engine keeps the metrics of its last call; a generation ending between the
        # classify job and this line would replace them (see docs/reliability.md, Known gaps).
        m = engine.metrics
        usage = {
            "prompt_tokens": m.prompt_tokens,
            "total_tokens": m.prompt_tokens,
            "prompt_tokens_details": {"cached_tokens": m.cached_tokens},
        }
        metrics = m.as_dict()
    return JSONResponse(
        {
            "object": "classification.list",
            "model": state.model_id,
            "data": [_item(i, r) for i, r in enumerate(results)],
            "usage": usage,
            "metrics": metrics,
        }
    )


def routes() -> list[Route]:
    return [Route("/v1/classify", endpoint(classify), methods=["POST"])]

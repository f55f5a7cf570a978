"""HTTP errors: exception types the server raises, and the one table mapping every error
type to its status and OpenAI error ``type``/``code`` (never by message text)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from lmx.errors import (
    ChatTemplateError,
    ContextLengthError,
    EngineClosedError,
    GroupLostError,
    ImageError,
    InvalidOptionError,
    LmxError,
    ModelNotFoundError,
    OutOfMemoryError,
    QueueFullError,
    TokenizerError,
)

logger = logging.getLogger(__name__)


class ApiRequestError(InvalidOptionError):
    """A request field is missing, of the wrong type, or not supported (400).

    Attributes:
        param: the request field at fault, as the client named it.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class UnsupportedParameterError(ApiRequestError):
    """A request asks for something this server does not do (``n > 1``, tools...) (400)."""


class MalformedBodyError(LmxError):
    """The request body is not a JSON object (422)."""


class AuthenticationError(LmxError):
    """The API key is missing or wrong (401)."""


class UnknownModelError(ModelNotFoundError):
    """The request names a model this server does not serve (404)."""

    def __init__(self, message: str, param: str | None = "model") -> None:
        super().__init__(message)
        self.param = param


class RouteNotFoundError(LmxError):
    """No such route (404)."""


class MethodNotAllowedError(LmxError):
    """The route exists, but not for this HTTP method (405)."""


class BodyTooLargeError(LmxError):
    """The request body is larger than ``max_body_bytes`` (413)."""


class TooManyConnectionsError(LmxError):
    """``max_connections`` connections are open already (503, retry later)."""


class RequestTimeoutError(LmxError):
    """The request body did not arrive within ``body_timeout`` seconds (408)."""


class ClientDisconnectedError(LmxError):
    """The client closed the connection before sending its whole request body (499: nobody
    reads the answer; logged as a refusal, not as an unexpected error)."""


@dataclass(frozen=True)
class ErrorKind:
    """How one error type is answered."""

    status: int
    type: str
    code: str | None


# Most specific first: the first entry the exception is an instance of wins.
ERROR_KINDS: tuple[tuple[type[BaseException], ErrorKind], ...] = (
    (UnsupportedParameterError, ErrorKind(400, "invalid_request_error", "unsupported_parameter")),
    (ApiRequestError, ErrorKind(400, "invalid_request_error", "invalid_parameter")),
    (ContextLengthError, ErrorKind(400, "invalid_request_error", "context_length_exceeded")),
    (InvalidOptionError, ErrorKind(400, "invalid_request_error", "invalid_parameter")),
    (ChatTemplateError, ErrorKind(400, "invalid_request_error", "chat_template_error")),
    (ImageError, ErrorKind(400, "invalid_request_error", "invalid_image")),
    (TokenizerError, ErrorKind(400, "invalid_request_error", "invalid_messages")),
    (AuthenticationError, ErrorKind(401, "authentication_error", "invalid_api_key")),
    (UnknownModelError, ErrorKind(404, "invalid_request_error", "model_not_found")),
    (RouteNotFoundError, ErrorKind(404, "invalid_request_error", "not_found")),
    (MethodNotAllowedError, ErrorKind(405, "invalid_request_error", "method_not_allowed")),
    (RequestTimeoutError, ErrorKind(408, "invalid_request_error", "request_timeout")),
    (BodyTooLargeError, ErrorKind(413, "invalid_request_error", "request_too_large")),
    (MalformedBodyError, ErrorKind(422, "invalid_request_error", "invalid_json")),
    (ClientDisconnectedError, ErrorKind(499, "invalid_request_error", "client_disconnected")),
    (QueueFullError, ErrorKind(503, "server_overloaded", "queue_full")),
    (TooManyConnectionsError, ErrorKind(503, "server_overloaded", "too_many_connections")),
    (OutOfMemoryError, ErrorKind(503, "server_overloaded", "out_of_memory")),
    (EngineClosedError, ErrorKind(503, "server_error", "engine_closed")),
    (GroupLostError, ErrorKind(503, "server_error", "tensor_parallel_group_lost")),
    (LmxError, ErrorKind(500, "server_error", "internal_error")),
)
INTERNAL = ErrorKind(500, "server_error", "internal_error")


def error_kind(exc: BaseException) -> ErrorKind:
    """The status, type and code that answer ``exc``."""
    for cls, kind in ERROR_KINDS:
        if isinstance(exc, cls):
            return kind
    return INTERNAL


def error_body(exc: BaseException, *, ollama: bool = False) -> tuple[int, dict[str, Any]]:
    """The status and JSON body answering ``exc``.

    OpenAI routes get ``{"error": {"message", "type", "param", "code"}}``; Ollama routes
    (``ollama=True``) get Ollama's ``{"error": "<message>"}``. An exception that is not an
    :class:`LmxError` is logged with its traceback and answered with a generic message.
    """
    kind = error_kind(exc)
    if isinstance(exc, LmxError):
        message = str(exc)
    else:
        logger.error("unexpected error while serving a request", exc_info=exc)
        message = f"internal server error ({type(exc).__name__}); see the server log"
    if ollama:
        return kind.status, {"error": message}
    param = getattr(exc, "param", None)
    return kind.status, {"error": {"message": message, "type": kind.type, "param": param, "code": kind.code}}

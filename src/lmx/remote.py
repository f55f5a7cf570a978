"""``lmx.RemoteBackend``: the :class:`lmx.Backend` protocol over HTTP, against any
OpenAI-compatible server (``lmx serve`` included), so code moves from an in-process engine
to a server by changing one line::

    backend = lmx.load("model-dir")                                  # in process
    backend = lmx.RemoteBackend("http://127.0.0.1:8090")             # over HTTP

Against an lmx server the results are the same as the engine's: text, token ids, logprobs
and metrics. Other servers lack lmx's extensions (``return_token_ids``, ``metrics``); pass
``lmx_extensions=False`` and token ids come back as -1, logprobs (unless asked for) as NaN,
and metrics hold only the token counts.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx

from lmx.classify import Classification, Example
from lmx.errors import (
    ContextLengthError,
    ImageError,
    InvalidOptionError,
    LmxError,
    ModelNotFoundError,
    OutOfMemoryError,
)
from lmx.generate.images import check_pan_and_scan
from lmx.generate.options import GenerationOptions
from lmx.results import Completion, GenerationMetrics, ModelInfo, Token, TopLogprob

Prompt = str | Sequence[int]
Message = dict[str, Any]


class RemoteStream:
    """The tokens of a streamed remote request, as :class:`lmx.engine.TokenStream` gives them:
    after it ends, ``metrics``, ``finish_reason``, ``text`` and ``tokens`` describe it;
    ``close()`` stops it early (``finish_reason`` ``"cancelled"``)."""

    def __init__(self, tokens: Iterator[Token], metrics: GenerationMetrics) -> None:
        self._it = tokens
        self.metrics = metrics
        self.finish_reason: str | None = None
        self.text = ""
        self.tokens: list[int] = []

    def __iter__(self) -> RemoteStream:
        return self

    def __next__(self) -> Token:
        token = next(self._it)
        self.text += token.text
        self.tokens.append(token.id)
        if token.finish_reason is not None:
            self.finish_reason = token.finish_reason
        return token

    def close(self) -> None:
        self._it.close()  # type: ignore[attr-defined]
        if self.finish_reason is None:
            self.finish_reason = "cancelled"

    def __enter__(self) -> RemoteStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RemoteError(LmxError):
    """The server answered with an error (or could not be reached).

    Attributes:
        status: the HTTP status (0 when the server could not be reached).
        code: the error ``code`` of the server's JSON error, when it gave one.
    """

    def __init__(self, message: str, status: int = 0, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code = status, code


def _error(status: int, body: Any, url: str) -> LmxError:
    """The lmx error for an HTTP error answer, chosen by status and error code."""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        message, code = str(err.get("message") or err), err.get("code")
    else:
        message, code = str(err if err is not None else body)[:500], None
    message = f"{message} (HTTP {status} from {url})"
    if status == 400 and code == "context_length_exceeded":
        return ContextLengthError(message)
    if status == 400 and code == "invalid_image":
        return ImageError(message)
    if status in (400, 422):
        return InvalidOptionError(message)
    if status == 404 and code == "model_not_found":
        return ModelNotFoundError(message)
    if code == "out_of_memory":
        return OutOfMemoryError(message)
    return RemoteError(message, status, code if isinstance(code, str) else None)


def _api_base(base_url: str) -> str:
    url = base_url.rstrip("/")
    path = urlsplit(url).path
    return url + "/v1" if path in ("", "/") else url


class RemoteBackend:
    """An :class:`lmx.Backend` that generates on an OpenAI-compatible server.

    Args:
        base_url: the server, e.g. ``http://127.0.0.1:8090`` (``/v1`` is added when the URL
            has no path) or a full API base such as ``http://host/v1``.
        api_key: sent as ``Authorization: Bearer <key>``.
        model: the model id to request; default: the first one ``/v1/models`` lists.
        timeout: seconds to wait for the server (connect and between streamed bytes).
        lmx_extensions: ask for token ids and metrics (lmx servers, vLLM); turn off for
            servers that refuse unknown request fields.
        client: an ``httpx.Client`` to use (left open by :meth:`close`); default: a new one.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        model: str | None = None,
        *,
        timeout: float = 600.0,
        lmx_extensions: bool = True,
        client: httpx.Client | None = None,
    ) -> None:
        self.base_url = _api_base(base_url)
        self.lmx_extensions = lmx_extensions
        self.metrics = GenerationMetrics()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._owns_client = client is None
        self._client = client or httpx.Client(timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)))
        self._headers = headers
        self._model = model

    # ------------------------------------------------------------------ HTTP
    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        url = self.base_url + path
        try:
            response = self._client.request(method, url, json=body, headers=self._headers)
        except httpx.HTTPError as e:
            raise RemoteError(f"cannot reach {url}: {e}") from e
        data = _json(response.content)
        if response.status_code >= 400:
            raise _error(response.status_code, data, url)
        return data

    def _stream_events(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The JSON events of a server-sent-event response, up to ``[DONE]``; closing the
        iterator closes the connection (the server then stops generating)."""
        url = self.base_url + path
        try:
            with self._client.stream("POST", url, json=body, headers=self._headers) as response:
                if response.status_code >= 400:
                    raise _error(response.status_code, _json(response.read()), url)
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    event = _json(data.encode())
                    if isinstance(event, dict) and "error" in event:
                        raise _error(500, event, url)
                    yield event
        except httpx.HTTPError as e:
            raise RemoteError(f"connection to {url} failed: {e}") from e

    @property
    def model(self) -> str:
        """The model id requests name."""
        if self._model is None:
            models = self._request("GET", "/models").get("data") or []
            if not models:
                raise ModelNotFoundError(f"{self.base_url}/models lists no model")
            self._model = str(models[0]["id"])
        return self._model

    # ------------------------------------------------------------------ options
    def _body(self, options: dict[str, Any], chat: bool) -> dict[str, Any]:
        """The request fields for engine options (checked here first, as the engine would)."""
        opts = GenerationOptions.from_kwargs(**options)
        body: dict[str, Any] = {"model": self.model}
        for name in options:
            value = getattr(opts, name)
            if name == "logit_bias":
                value = {str(k): v for k, v in (value or {}).items()}
            elif name == "stop":
                value = list(value)
            elif name == "logprobs":
                continue
            elif name == "adapter":  # an lmx server picks an adapter by the request's model
                if value is not None:
                    body["model"] = value
                continue
            elif name == "constraint":
                if value is None:
                    continue
                name, value = "grammar", {"type": value.kind, "value": value.source}  # lmx's extension field
            body[name] = value
        if opts.logprobs is not None or self.lmx_extensions:
            if chat:
                body["logprobs"] = True
                body["top_logprobs"] = opts.logprobs or 0
            else:
                body["logprobs"] = opts.logprobs or 0
        if self.lmx_extensions:
            body["return_token_ids"] = True
        return body

    def _tokens(self, choice: dict[str, Any], chat: bool, finish: bool) -> list[Token]:
        """The tokens one choice (or streamed chunk) carries."""
        text = (choice.get("delta") or choice.get("message") or {}).get("content") if chat else choice.get("text")
        text = text or ""
        ids = choice.get("token_ids")
        lps: list[float] = []
        tops: list[tuple[tuple[int, float], ...] | None] = []
        logprobs = choice.get("logprobs")
        if chat and logprobs:
            for entry in logprobs.get("content") or []:
                lps.append(float(entry["logprob"]))
                alts = entry.get("top_logprobs") or []
                tops.append(
                    tuple(TopLogprob(int(a["id"]), float(a["logprob"]), str(a.get("token", ""))) for a in alts)
                    if alts and "id" in alts[0]
                    else None
                )
        elif logprobs:
            lps = [float(v) for v in logprobs.get("token_logprobs") or []]
            by_id = logprobs.get("top_logprobs_by_id")
            if by_id is not None:
                pieces = logprobs.get("top_logprobs") or []
                tops = [
                    tuple(TopLogprob(int(i), float(lp), _piece_of(pieces, n, float(lp))) for i, lp in alts)
                    for n, alts in enumerate(by_id)
                ]
        n = len(ids) if ids is not None else max(len(lps), 1 if text or finish else 0)
        out = []
        for i in range(n):
            last = i == n - 1
            out.append(
                Token(
                    id=int(ids[i]) if ids is not None else -1,
                    # a chunk's text goes on its last token: the engine releases text the same way
                    text=text if last else "",
                    logprob=lps[i] if i < len(lps) else math.nan,
                    top_logprobs=tops[i] if i < len(tops) else None,
                    finish_reason=choice.get("finish_reason") if last else None,
                )
            )
        return out

    def _metrics(self, data: dict[str, Any]) -> GenerationMetrics:
        known = GenerationMetrics.__dataclass_fields__
        metrics = GenerationMetrics(**{k: v for k, v in (data.get("metrics") or {}).items() if k in known})
        usage = data.get("usage") or {}
        if "prompt_tokens" in usage:
            metrics.prompt_tokens = int(usage["prompt_tokens"])
        if "completion_tokens" in usage:
            metrics.generated_tokens = int(usage["completion_tokens"])
        return metrics

    def _complete(self, path: str, body: dict[str, Any], chat: bool) -> Completion:
        data = self._request("POST", path, body)
        choice = data["choices"][0]
        tokens = self._tokens(choice, chat, finish=True)
        text = (choice.get("message") or {}).get("content") if chat else choice.get("text")
        self.metrics = self._metrics(data)
        want_top = body.get("top_logprobs") or (not chat and body.get("logprobs"))
        return Completion(
            text=text or "",
            tokens=[t.id for t in tokens],
            finish_reason=choice.get("finish_reason") or "length",
            metrics=self.metrics,
            logprobs=[t.logprob for t in tokens],
            top_logprobs=[t.top_logprobs for t in tokens] if want_top else None,  # type: ignore[misc]
        )

    def _stream(self, path: str, body: dict[str, Any], chat: bool) -> RemoteStream:
        metrics = GenerationMetrics()
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        events = self._stream_events(path, body)  # nothing is sent until the first token is asked for

        def tokens() -> Iterator[Token]:
            try:
                for event in events:
                    if not event.get("choices"):
                        if event.get("usage") or event.get("metrics"):
                            for k, v in vars(self._metrics(event)).items():
                                setattr(metrics, k, v)
                            self.metrics = metrics
                        continue
                    yield from self._tokens(
                        event["choices"][0], chat, finish=event["choices"][0].get("finish_reason") is not None
                    )
            finally:
                events.close()

        return RemoteStream(tokens(), metrics)

    # ------------------------------------------------------------------ Backend
    def generate(self, prompt: Prompt, **options: Any) -> Completion:
        """Complete ``prompt`` (text or token ids) with ``POST /v1/completions``."""
        return self._complete(
            "/completions", {**self._body(options, chat=False), "prompt": _prompt(prompt)}, chat=False
        )

    def stream(self, prompt: Prompt, **options: Any) -> RemoteStream:
        """Like :meth:`generate`, streaming; ``close()`` the stream to stop the server generating."""
        return self._stream("/completions", {**self._body(options, chat=False), "prompt": _prompt(prompt)}, chat=False)

    def chat(self, messages: list[Message], *, chat_template_kwargs: dict | None = None, **options: Any) -> Completion:
        """Reply to a conversation with ``POST /v1/chat/completions``."""
        return self._complete("/chat/completions", self._chat_body(messages, chat_template_kwargs, options), chat=True)

    def stream_chat(
        self, messages: list[Message], *, chat_template_kwargs: dict | None = None, **options: Any
    ) -> RemoteStream:
        """Like :meth:`chat`, streaming."""
        return self._stream("/chat/completions", self._chat_body(messages, chat_template_kwargs, options), chat=True)

    def batch_generate(self, prompts: Sequence[Prompt], **options: Any) -> list[Completion]:
        """Complete several prompts (one request each; the server queues them)."""
        return [self.generate(p, **options) for p in prompts]

    def classify(
        self,
        texts: Sequence[str],
        labels: Sequence[str],
        *,
        instruction: str | None = None,
        examples: Sequence[Example] | None = None,
        batch_size: int | None = None,
        max_text_tokens: int | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[Classification]:
        """Sort each text into one of ``labels`` with ``POST /v1/classify`` (lmx servers only);
        see :func:`lmx.classify.classify`. The results equal the server's engine's.

        Args:
            texts: the texts (non-empty strings).
            labels: the candidate answers (distinct, non-empty strings).
            instruction: what the model is told before each text (default: the engine's).
            examples: worked examples, ``(text, label)`` pairs or ``{"text", "label"}`` dicts.
            batch_size: accepted for the engine's signature; the server chooses its own
                (results do not depend on it).
            max_text_tokens: cut every text to at most this many tokens.
            chat_template_kwargs: extra chat template variables.

        Returns:
            One :class:`lmx.Classification` per text, in order.

        Raises:
            InvalidOptionError: the server refused the request (400), e.g. bad labels, or
                more texts than its ``max_classify_texts``.
            RemoteError: the server failed or could not be reached.
        """
        if isinstance(texts, str) or isinstance(labels, str):
            raise InvalidOptionError("texts and labels must be lists of strings; wrap a single text in a list")
        body: dict[str, Any] = {"model": self.model, "texts": list(texts), "labels": list(labels)}
        if examples is not None:
            body["examples"] = [_example(i, ex) for i, ex in enumerate(examples)]
        if instruction is not None:
            body["instruction"] = instruction
        if max_text_tokens is not None:
            body["max_text_tokens"] = max_text_tokens
        if chat_template_kwargs:
            body["chat_template_kwargs"] = chat_template_kwargs
        data = self._request("POST", "/classify", body)
        self.metrics = self._metrics(data)
        return [
            Classification(
                label=item["label"],
                scores={k: float(v) for k, v in item["scores"].items()},
                logprobs={k: float(v) for k, v in item["logprobs"].items()},
                truncated=bool(item.get("truncated", False)),
            )
            for item in sorted(data["data"], key=lambda item: item["index"])
        ]

    def info(self) -> ModelInfo:
        """The served model, described by lmx's ``/v1/models`` extension when the server has it."""
        models = self._request("GET", "/models").get("data") or []
        card = next((m for m in models if m.get("id") == self.model), None)
        if card is None:
            raise ModelNotFoundError(f"{self.base_url}/models does not list {self.model!r}")
        extra = card.get("lmx")
        if isinstance(extra, dict):
            known = ModelInfo.__dataclass_fields__
            return ModelInfo(**{k: v for k, v in extra.items() if k in known})
        return ModelInfo(
            name=self.model, source=self.base_url, model_type="unknown", num_parameters=0, num_layers=0,
            hidden_size=0, vocab_size=0, context_length=0, dtype="unknown", quantization=None,
            device="remote", weights_bytes=0,
        )  # fmt: skip

    def close(self) -> None:
        """Close the HTTP connections (a client passed in stays open). Idempotent."""
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> RemoteBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _chat_body(
        self, messages: list[Message], template_kwargs: dict | None, options: dict[str, Any]
    ) -> dict[str, Any]:
        options = dict(options)
        # an image option, not a generation option: sent as the lmx server's pan_and_scan field
        pan_and_scan = check_pan_and_scan(options.pop("pan_and_scan", None))
        body = {**self._body(options, chat=True), "messages": [_wire_message(m) for m in messages]}
        if template_kwargs:
            body["chat_template_kwargs"] = template_kwargs
        if pan_and_scan is not None:
            body["pan_and_scan"] = pan_and_scan
        return body


def _wire_message(message: Message) -> Message:
    """A message as JSON can carry it: image parts (the file's bytes, or a local path read here)
    become OpenAI ``image_url`` parts with a ``data:`` URL (the server fetches no URL)."""
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        return message
    parts = []
    for i, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") == "image"):
            parts.append(part)
            continue
        data = part.get("image")
        if data is None and "path" in part:
            try:
                with open(part["path"], "rb") as f:
                    data = f.read()
            except (OSError, TypeError) as e:
                raise ImageError(f"image {i}: cannot read the image file {part['path']!r}: {e}") from e
        if not isinstance(data, (bytes, bytearray)):
            raise ImageError(f"image {i}: an image part needs 'image' (the file's bytes) or 'path'")
        url = "data:application/octet-stream;base64," + base64.b64encode(bytes(data)).decode("ascii")
        parts.append({"type": "image_url", "image_url": {"url": url}})
    return {**message, "content": parts}


def _prompt(prompt: Prompt) -> str | list[int]:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    raise InvalidOptionError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")


def _example(i: int, example: Example) -> dict[str, Any]:
    if isinstance(example, Mapping):
        return dict(example)
    if isinstance(example, Sequence) and not isinstance(example, str) and len(example) == 2:
        return {"text": example[0], "label": example[1]}
    raise InvalidOptionError(f"examples[{i}] must be a (text, label) pair or a dict, got {example!r:.80}")


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return raw.decode("utf-8", "replace")[:500]


__all__ = ["RemoteBackend", "RemoteError"]


def _piece_of(pieces: list[Any], n: int, logprob: float) -> str:
    """The text of token ``n``'s alternative with ``logprob``, from a text completion's
    ``top_logprobs`` (``{piece: logprob}``; "" where pieces collide or are missing)."""
    alts = pieces[n] if n < len(pieces) and isinstance(pieces[n], dict) else {}
    found = [piece for piece, lp in alts.items() if lp == logprob]
    return found[0] if len(found) == 1 else ""

"""``ServerSettings``: everything ``lmx serve`` can be told, validated when built."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from lmx.errors import InvalidOptionError
from lmx.generate.options import GenerationOptions
from lmx.tokenizer.sandbox import DEFAULT_MAX_OUTPUT_CHARS, DEFAULT_TIMEOUT_S, TemplateLimits

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8090
DEFAULT_MAX_TOKENS = 512


@dataclass(frozen=True)
class ServerSettings:
    """How the API server runs.

    Attributes:
        model: the model to load when :func:`lmx.server.create_app` gets no engine: an HF
            directory, a ``.gguf`` file, or None for the bundled default.
        device: ``"cpu"``, ``"gpu"`` or None (``LMX_DEVICE``, else the GPU if present).
        dtype: weight dtype for loading (see :func:`lmx.load`).
        draft_model: a small model of the same vocabulary that drafts for speculative decoding
            (see :func:`lmx.load`); requests then speculate with it unless they say otherwise.
        speculative: the ``speculative`` option of requests that give none: None,
            ``"prompt-lookup"`` or ``"draft-model"`` (see :class:`lmx.GenerationOptions`).
        kv_bits: keep the KV cache quantized to 8 or 4 bits (None: ``LMX_KV_BITS``, unset: float);
            ``kv_group_size`` elements per scale (see :func:`lmx.load`).
        adapters: LoRA adapters (directories from ``lmx train``) to serve beside the model,
            each ``"NAME=PATH"`` or a bare ``"PATH"`` (named after its directory); a request
            whose ``model`` is an adapter's name runs with it (see :func:`parse_adapter`).
        model_name: the id clients name the model by; default: the loaded model's name.
        host: address to bind; loopback unless told otherwise.
        port: TCP port.
        api_key: when set, every route but ``/health`` needs ``Authorization: Bearer <key>``
            (or HTTP Basic auth with the key as password, which browsers can send).
        max_concurrency: requests decoded together (rows of the engine's continuously
            batched loop; each has its own options and joins or leaves between steps). 1: one
            request at a time. Default 32.
        max_queue: requests allowed to wait behind the running ones; one more is answered 503.
        max_body_bytes: the largest request body accepted; a larger one is answered 413.
        max_tokens_default: ``max_tokens`` of a request that gives none (at most the context
            length); None: until the end of the context. Default 512, as the Lab page asks: a
            client that sends none (the openai snippets, LangChain) gets an answer in seconds, not
            32,768 tokens later.
        strict_model_names: answer 404 to a request naming a model other than the served one.
            Off by default: one model is served, so any name runs it, as in llama.cpp.
        cors_origins: origins allowed to call the API from a browser (``"*"`` for any);
            empty (the default) sends no CORS headers, so other sites cannot.
        keep_alive_timeout: seconds an idle keep-alive connection stays open, and the time a
            client has to send a whole request head.
        body_timeout: seconds a client has to send a whole request body after its head; a
            slower one is answered 408 and closed. Default 30.
        max_connections: open connections at once; one more evicts the connection that has
            waited longest for its client (answered 503), or is answered 503 itself when every
            open one has a request running. Keep it below the process's file-descriptor limit
            (``ulimit -n``). Default 128.
        max_classify_texts: the most texts one ``POST /v1/classify`` request may hold; more
            are answered 400 (``param`` ``texts``). The call holds the model to itself until
            every text is scored, so this bounds how long one request stalls generation.
            Default 256.
        max_classify_labels: the most labels one ``POST /v1/classify`` request may hold; more
            are answered 400 (``param`` ``labels``). Every (text, label) pair is scored, so
            this and ``max_classify_texts`` together bound one call's work. Default 128.
        max_embed_inputs: the most inputs one ``POST /v1/embeddings`` or ``/api/embed`` request
            may hold; more are answered 400 (``param`` ``input``). The call holds the model to
            itself until every input is embedded. Default 256.
        max_n: the most choices (OpenAI ``n``) one request may ask for; more are answered 400.
            Each choice is a row of the batch. Default 8.
        lab: serve the Lab chat page at ``/``.
        public_metrics: serve ``GET /metrics`` (Prometheus) without the API key; by default it
            needs the key like every other route but ``/health``.
        warm_up: generate one token when the app is created (see :func:`lmx.server.app.create_app`).
        allow_request_chat_template: let a request replace the model's chat template with
            ``chat_template_kwargs.chat_template`` (Jinja source or a template name). Off by
            default, as in llama.cpp and vLLM: such a request is answered 400.
        allow_local_images: a directory: OpenAI ``image_url`` parts may name image files under
            it (a path or ``file://`` URL). None (default): only ``data:`` URLs are taken. Remote
            URLs are never fetched.
        chat_template_timeout: seconds one chat template render may take (from a request or
            the model's own); a longer one is stopped and answered 400.
        chat_template_max_chars: the longest prompt a chat template may render, and the
            longest string or list one of its expressions may build.
    """

    model: str | None = None
    device: str | None = None
    dtype: str = "auto"
    draft_model: str | None = None
    speculative: str | None = None
    kv_bits: int | None = None
    kv_group_size: int = 64
    adapters: tuple[str, ...] = ()
    model_name: str | None = None
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_key: str | None = None
    max_concurrency: int = 32
    max_queue: int = 16
    max_body_bytes: int = 4 * 2**20
    max_tokens_default: int | None = DEFAULT_MAX_TOKENS
    strict_model_names: bool = False
    cors_origins: tuple[str, ...] = field(default_factory=tuple)
    keep_alive_timeout: float = 5.0
    body_timeout: float = 30.0
    max_connections: int = 128
    max_classify_texts: int = 256
    max_classify_labels: int = 128
    max_embed_inputs: int = 256
    max_n: int = 8
    lab: bool = True
    public_metrics: bool = False
    warm_up: bool = True
    allow_request_chat_template: bool = False
    allow_local_images: str | None = None
    chat_template_timeout: float = DEFAULT_TIMEOUT_S
    chat_template_max_chars: int = DEFAULT_MAX_OUTPUT_CHARS

    def __post_init__(self) -> None:
        object.__setattr__(self, "cors_origins", tuple(self.cors_origins))
        specs = (self.adapters,) if isinstance(self.adapters, str) else tuple(self.adapters)
        object.__setattr__(self, "adapters", specs)
        names = [parse_adapter(spec)[0] for spec in specs]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise InvalidOptionError(f"adapter names must differ, got {', '.join(map(repr, twice))} more than once")
        self.template_limits  # noqa: B018 (builds TemplateLimits, which checks both values)
        GenerationOptions(speculative=self.speculative)  # raises InvalidOptionError naming the allowed modes
        if self.speculative == "draft-model" and self.draft_model is None:
            raise InvalidOptionError("speculative='draft-model' needs draft_model (lmx serve --draft-model PATH)")
        if not self.host:
            raise InvalidOptionError("host must be an address or a host name, got ''")
        _check_int("port", self.port, 0, 65535)
        _check_int("max_concurrency", self.max_concurrency, 1, 256)
        _check_int("max_queue", self.max_queue, 0, None)
        _check_int("max_body_bytes", self.max_body_bytes, 1024, None)
        if self.max_tokens_default is not None:
            _check_int("max_tokens_default", self.max_tokens_default, 1, None)
        if self.api_key is not None and not self.api_key.strip():
            raise InvalidOptionError("api_key must not be empty or blank; leave it unset for no key")
        _check_int("max_connections", self.max_connections, 1, None)
        _check_int("max_classify_texts", self.max_classify_texts, 1, None)
        _check_int("max_classify_labels", self.max_classify_labels, 1, None)
        _check_int("max_embed_inputs", self.max_embed_inputs, 1, None)
        _check_int("max_n", self.max_n, 1, 256)
        if self.allow_local_images is not None and not Path(self.allow_local_images).is_dir():
            raise InvalidOptionError(f"allow_local_images must be a directory, got {self.allow_local_images!r}")
        for name in ("keep_alive_timeout", "body_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise InvalidOptionError(f"{name} must be a number of seconds > 0, got {value!r}")
        for origin in self.cors_origins:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise InvalidOptionError(
                    f"cors_origins entries must be '*' or start with http:// or https://, got {origin!r}"
                )

    @property
    def template_limits(self) -> TemplateLimits:
        """The limits every chat template render of this server runs under."""
        return TemplateLimits(timeout_s=self.chat_template_timeout, max_output_chars=self.chat_template_max_chars)

    @property
    def is_loopback(self) -> bool:
        """Whether ``host`` only accepts connections from this machine."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def parse_adapter(spec: str) -> tuple[str, str]:
    """``(name, path)`` of an adapter given as ``"NAME=PATH"`` or ``"PATH"`` (named after its
    directory).

    Raises:
        InvalidOptionError: an empty spec or a bad name.
    """
    from lmx.train.adapters import NAME_PATTERN, check_name, default_name

    if not isinstance(spec, str) or not spec.strip():
        raise InvalidOptionError(f"an adapter must be 'NAME=PATH' or a directory, got {spec!r:.80}")
    name, sep, path = spec.partition("=")
    if sep and NAME_PATTERN.fullmatch(name) and path:
        return name, path
    return check_name(default_name(spec)), spec


def _check_int(name: str, value: object, lo: int | None, hi: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidOptionError(f"{name} must be an integer, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        allowed = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise InvalidOptionError(f"{name} must be {allowed}, got {value}")

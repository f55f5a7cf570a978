"""``lmx serve``: the OpenAI- and Ollama-compatible API and the Lab chat page (default
http://127.0.0.1:8090)."""

from __future__ import annotations

import argparse
import logging
import sys

from lmx.cli.common import add_model_args, add_parallel_args, launch_tensor_parallel, load_engine, parallel_size
from lmx.runtime import settings as env_settings
from lmx.server.settings import DEFAULT_MAX_TOKENS
from lmx.tokenizer.sandbox import DEFAULT_MAX_OUTPUT_CHARS, DEFAULT_TIMEOUT_S


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the model over an OpenAI/Ollama-compatible API with the Lab chat page")
    add_model_args(p, named_adapters=True, draft=True)
    p.add_argument(
        "--speculative",
        choices=["prompt-lookup", "draft-model"],
        default=None,
        help="speculative decoding for greedy requests that give no speculative field of their own "
        "(default: draft-model with --draft-model, else off)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", "-p", type=int, default=8090)
    p.add_argument(
        "--api-key",
        default=None,
        help="require this key on every route but /health (default: $LMX_API_KEY; none)",
    )
    p.add_argument("--model-name", default=None, help="the model id clients use (default: the model's name)")
    p.add_argument(
        "--max-concurrency",
        type=int,
        default=32,
        help="requests decoded together (continuous batching: requests join and leave between steps; "
        "default 32; 1: one at a time)",
    )
    p.add_argument("--max-queue", type=int, default=16, help="requests that may wait; more get 503 (default 16)")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        help=f"max_tokens of requests that give none (default {DEFAULT_MAX_TOKENS}; 0: the whole context)",
    )
    p.add_argument(
        "--strict-model-names",
        action="store_true",
        help="answer 404 to requests naming another model (default: any name runs the served model, as llama.cpp)",
    )
    p.add_argument("--max-body-bytes", type=int, default=4 * 2**20, help="largest request body (default 4 MiB)")
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="allow browser calls from ORIGIN (repeatable)",
    )
    p.add_argument(
        "--keep-alive-timeout",
        type=float,
        default=5.0,
        help="seconds an idle connection stays open, and a client has to send a request head (default 5)",
    )
    p.add_argument(
        "--body-timeout",
        type=float,
        default=30.0,
        help="seconds a client has to send a whole request body; slower ones get 408 (default 30)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=128,
        help="open connections at once; beyond it the longest-waiting one gets 503 (default 128; keep it below ulimit -n)",
    )
    p.add_argument(
        "--max-classify-texts",
        type=int,
        default=256,
        help="most texts one POST /v1/classify request may hold; more get 400 (default 256)",
    )
    p.add_argument(
        "--max-classify-labels",
        type=int,
        default=128,
        help="most labels one POST /v1/classify request may hold; more get 400 (default 128)",
    )
    p.add_argument(
        "--max-embed-inputs",
        type=int,
        default=256,
        help="most inputs one POST /v1/embeddings or /api/embed request may hold; more get 400 (default 256)",
    )
    p.add_argument(
        "--max-n",
        type=int,
        default=8,
        help="most choices (OpenAI n) one request may ask for; more get 400 (default 8)",
    )
    p.add_argument(
        "--allow-request-chat-template",
        action="store_true",
        help="let requests replace the chat template (chat_template_kwargs.chat_template); off by default",
    )
    p.add_argument(
        "--allow-local-images",
        metavar="DIR",
        default=None,
        help="let image_url parts name image files under DIR (off by default: data: URLs only; "
        "remote URLs are never fetched)",
    )
    p.add_argument(
        "--chat-template-timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"seconds one chat template render may take (default {DEFAULT_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--chat-template-max-chars",
        type=int,
        default=DEFAULT_MAX_OUTPUT_CHARS,
        help=f"longest prompt (and string) a chat template may build (default {DEFAULT_MAX_OUTPUT_CHARS})",
    )
    p.add_argument(
        "--public-metrics",
        action="store_true",
        help="serve GET /metrics (Prometheus) without the API key (default: it needs the key)",
    )
    p.add_argument("--no-lab", action="store_true", help="do not serve the Lab chat page at /")
    p.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn's and lmx.server's log level; info logs one line per request (method, path, status, "
        "tokens, tok/s, ms)",
    )
    add_parallel_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lmx.server import ServerSettings, serve

    if parallel_size(args) and args.adapter:
        from lmx.errors import InvalidOptionError

        raise InvalidOptionError("--adapter is not supported with --tensor-parallel or --pipeline-parallel")
    code = launch_tensor_parallel(args)
    if code is not None:
        return code

    settings = ServerSettings(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        draft_model=args.draft_model,
        speculative=args.speculative,
        kv_bits=args.kv_bits,
        kv_group_size=args.kv_group_size,
        adapters=tuple(args.adapter),
        model_name=args.model_name,
        host=args.host,
        port=args.port,
        api_key=args.api_key or env_settings.LMX_API_KEY.get(),
        max_concurrency=args.max_concurrency,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes,
        max_tokens_default=args.max_tokens or None,
        strict_model_names=args.strict_model_names,
        cors_origins=tuple(args.cors_origin),
        keep_alive_timeout=args.keep_alive_timeout,
        body_timeout=args.body_timeout,
        max_connections=args.max_connections,
        max_classify_texts=args.max_classify_texts,
        max_classify_labels=args.max_classify_labels,
        max_embed_inputs=args.max_embed_inputs,
        max_n=args.max_n,
        lab=not args.no_lab,
        public_metrics=args.public_metrics,
        allow_request_chat_template=args.allow_request_chat_template,
        allow_local_images=args.allow_local_images,
        chat_template_timeout=args.chat_template_timeout,
        chat_template_max_chars=args.chat_template_max_chars,
    )
    logging.getLogger("lmx.server").setLevel(args.log_level.upper())  # the root logger stays at warning
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    engine = None
    if parallel_size(args):
        # every rank loads its slices; rank 0 serves, the others replay its batches until it closes
        engine = load_engine(args)
        if not engine.is_leader:
            engine.follow()
            return 0
    print(f"lmx: loading the model, then serving on http://{host}:{settings.port}", file=sys.stderr)
    try:
        serve(settings, engine, log_level=args.log_level)
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown: the normal way to stop
        print("lmx: server stopped", file=sys.stderr)
    finally:
        if engine is not None:
            engine.close()  # the other ranks end with it
    return 0

"""The lmx server: an OpenAI- and Ollama-compatible HTTP API and the Lab chat page.

>>> from lmx.server import ServerSettings, create_app, serve
>>> serve(ServerSettings(model="path/to/model", port=8090))     # or: lmx serve

The app (starlette, uvicorn and every route) is imported when first asked for, so a command that
only reads :mod:`lmx.server.settings` (every ``lmx`` command builds ``lmx serve``'s options)
does not pay for it.
"""

from __future__ import annotations

from lmx.server.settings import ServerSettings


def __getattr__(name: str) -> object:
    if name in ("create_app", "serve", "uvicorn_config"):
        from lmx.server import app

        return getattr(app, name)
    if name == "BackgroundServer":
        from lmx.server.background import BackgroundServer

        return BackgroundServer
    raise AttributeError(f"module 'lmx.server' has no attribute {name!r}")


__all__ = ["BackgroundServer", "ServerSettings", "create_app", "serve", "uvicorn_config"]

"""The lmx server: an OpenAI- and Ollama-compatible HTTP API and the Lab chat page.

>>> from lmx.server import ServerSettings, create_app, serve
>>> serve(ServerSettings(model="path/to/model", port=8090))     # or: lmx serve
"""

from __future__ import annotations

from lmx.server.app import create_app, serve, uvicorn_config
from lmx.server.background import BackgroundServer
from lmx.server.settings import ServerSettings

__all__ = ["BackgroundServer", "ServerSettings", "create_app", "serve", "uvicorn_config"]

"""Run the server on a background thread of this process (notebooks, tests, benchmarks)."""

from __future__ import annotations

import socket
import threading
from typing import Any

from lmx.errors import LmxError
from lmx.server.app import create_app, uvicorn_config
from lmx.server.settings import ServerSettings


class BackgroundServer:
    """Serve an engine from a background thread; ``port=0`` in the settings picks a free port.

    >>> with BackgroundServer(ServerSettings(port=0), engine) as server:
    ...     client = openai.OpenAI(base_url=server.url + "/v1", api_key="-")

    Args:
        settings: how to serve (host, port, key, queue...).
        engine: an already-loaded engine (left open afterwards), or None to load ``settings.model``.
        start_timeout: seconds to wait for the server to accept connections.
    """

    def __init__(
        self, settings: ServerSettings | None = None, engine: Any = None, *, start_timeout: float = 30.0
    ) -> None:
        import uvicorn

        self.settings = settings or ServerSettings(port=0)
        self.app = create_app(self.settings, engine)
        self._server = uvicorn.Server(uvicorn_config(self.app, self.settings))
        self._server.install_signal_handlers = lambda: None  # type: ignore[method-assign]  # not the main thread
        self._start_timeout = start_timeout
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self.port = self.settings.port

    @property
    def url(self) -> str:
        """``http://host:port`` of the running server."""
        host = self.settings.host
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.port}"

    @property
    def state(self) -> Any:
        """The app's :class:`lmx.server.common.ServerState` (engine, scheduler...)."""
        return self.app.state.lmx

    def start(self) -> BackgroundServer:
        """Bind, start serving, and wait until the server is up.

        Raises:
            LmxError: the server did not start within ``start_timeout`` seconds.
        """
        family = socket.AF_INET6 if ":" in self.settings.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.settings.host, self.settings.port))
        self._socket = sock
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="lmx-server", daemon=True
        )
        self._thread.start()
        self._thread.join(0)
        waited = 0.0
        while not self._server.started:
            if not self._thread.is_alive() or waited > self._start_timeout:
                self.stop()
                raise LmxError(f"the server did not start on {self.url} within {self._start_timeout} s")
            threading.Event().wait(0.02)
            waited += 0.02
        return self

    def stop(self) -> None:
        """Stop serving (running requests are cancelled) and wait for the thread. Idempotent."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(15)
            self._thread = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

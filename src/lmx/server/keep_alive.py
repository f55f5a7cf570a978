"""Ollama's ``keep_alive``: how long the model stays loaded after a request.

lmx serves one model that stays loaded for the server's life, so the value only means something
in two places: ``0`` ("unload now") clears the engine's prefix cache once the request has ended
(the memory the cached prompts held goes back), and the last value given is what ``/api/ps``
reports as the model's ``expires_at``. Values follow Ollama: a number of seconds, a Go duration
string (``"5m"``, ``"1h30m"``, ``"500ms"``), and a negative value for "forever".
"""

from __future__ import annotations

import datetime
import re
import time
from typing import Any

from lmx.server.errors import ApiRequestError

DEFAULT_KEEP_ALIVE_S = 300.0  # Ollama's default: 5 minutes
FOREVER = datetime.datetime(2318, 1, 1, tzinfo=datetime.timezone.utc)  # what Ollama reports for "forever"

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_DURATION = re.compile(rf"[-+]?(?:{_PART.pattern})+")
_SECONDS = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")


def parse_keep_alive(value: Any, param: str = "keep_alive") -> float | None:
    """Seconds the model should stay loaded (None: forever), from an Ollama ``keep_alive``.

    Raises:
        ApiRequestError: not a number of seconds nor a duration such as ``"5m"`` (``param`` names it).
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
        return None if value < 0 else float(value)
    if isinstance(value, str):
        text = value.strip()
        if _SECONDS.fullmatch(text):  # a number of seconds as text ("300", "-1")
            number = float(text)
            return None if number < 0 else number
        if _DURATION.fullmatch(text):
            seconds = sum(float(n) * _UNITS[unit] for n, unit in _PART.findall(text))
            return None if text.startswith("-") else seconds
    raise ApiRequestError(
        f'{param} must be a duration such as "5m", "1h" or "30s", a number of seconds, or -1 (forever); '
        f"got {value!r:.60}",
        param=param,
    )


class KeepAlive:
    """The keep-alive of the served model: the last value a request gave, and when."""

    def __init__(self) -> None:
        self.seconds: float | None = DEFAULT_KEEP_ALIVE_S
        self.last_used = time.time()

    def note(self, value: Any) -> float | None:
        """Record a request's ``keep_alive`` (None: the default) and its time; return its seconds.

        Raises:
            ApiRequestError: a value :func:`parse_keep_alive` refuses.
        """
        seconds = DEFAULT_KEEP_ALIVE_S if value is None else parse_keep_alive(value)
        self.seconds = seconds
        self.last_used = time.time()
        return seconds

    def expires_at(self) -> datetime.datetime:
        """When Ollama would unload the model (lmx keeps it loaded: this is only reported)."""
        if self.seconds is None:
            return FOREVER
        return datetime.datetime.fromtimestamp(self.last_used + self.seconds, datetime.timezone.utc)


__all__ = ["DEFAULT_KEEP_ALIVE_S", "KeepAlive", "parse_keep_alive"]

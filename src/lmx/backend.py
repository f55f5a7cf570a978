"""``lmx.Backend``: the engine's public surface as a protocol, so implementations can swap."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

from lmx.classify import Classification
from lmx.results import Completion, ModelInfo, Token


@runtime_checkable
class Backend(Protocol):
    """What applications code against: an in-process :class:`lmx.Engine` or a remote server."""

    def generate(self, prompt: str | Sequence[int], **options: Any) -> Completion: ...

    def stream(self, prompt: str | Sequence[int], **options: Any) -> Iterator[Token]: ...

    def chat(self, messages: list[dict[str, Any]], **options: Any) -> Completion: ...

    def stream_chat(self, messages: list[dict[str, Any]], **options: Any) -> Iterator[Token]: ...

    def batch_generate(self, prompts: Sequence[str | Sequence[int]], **options: Any) -> list[Completion]: ...

    def classify(self, texts: Sequence[str], labels: Sequence[str], **options: Any) -> list[Classification]: ...

    def info(self) -> ModelInfo: ...

    def close(self) -> None: ...

"""lmx: run, serve and fine-tune Gemma 3 and Qwen 3 on MLX.

>>> import lmx
>>> engine = lmx.load()            # the bundled Gemma 3 270M
>>> engine.generate("The capital of France is", max_tokens=8).text
"""

from __future__ import annotations

# Must come first: on Linux it loads OpenBLAS globally before anything imports mlx.core.
from lmx import runtime as runtime  # isort: skip

from lmx import errors
from lmx.backend import Backend
from lmx.classify import Classification
from lmx.engine import Engine, TokenStream, load
from lmx.errors import LmxError
from lmx.generate.constraints import Constraint
from lmx.generate.options import GenerationOptions
from lmx.results import Completion, GenerationMetrics, ModelInfo, Token, ToolCall, TopLogprob
from lmx.runtime import memory

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # RemoteBackend pulls in httpx; import it only when asked for.
    if name == "RemoteBackend":
        from lmx.remote import RemoteBackend

        return RemoteBackend
    raise AttributeError(f"module 'lmx' has no attribute {name!r}")


__all__ = [
    "Backend",
    "Classification",
    "Completion",
    "Constraint",
    "Engine",
    "GenerationMetrics",
    "GenerationOptions",
    "LmxError",
    "ModelInfo",
    "RemoteBackend",
    "Token",
    "TokenStream",
    "ToolCall",
    "TopLogprob",
    "__version__",
    "errors",
    "load",
    "memory",
]

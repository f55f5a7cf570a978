"""The engine: a thin facade over the scheduler that owns the model.

Every call (generate, stream, chat, batch_generate, classify) becomes requests of the
:class:`lmx.scheduler.Scheduler`, which runs them all, alone or batched, on one worker thread.

- :mod:`lmx.engine.core`: :class:`Engine`, the calls a user makes.
- :mod:`lmx.engine.stream`: :class:`TokenStream` (one request's tokens) and :func:`collect`.
- :mod:`lmx.engine.start`: :func:`load`, a model as a running engine (draft model, adapter,
  process group).
- :mod:`lmx.engine.checks`, :mod:`lmx.engine.report`: keyword and vocabulary checks; what
  ``info()`` says of GGUF blocks and tensor-parallel groups.
"""

from lmx.engine.checks import check_draft_vocabulary
from lmx.engine.core import DEFAULT_PREFIX_CACHE_BYTES, Engine, Message, Prompt
from lmx.engine.start import load
from lmx.engine.stream import TokenStream, collect

__all__ = [
    "DEFAULT_PREFIX_CACHE_BYTES",
    "Engine",
    "Message",
    "Prompt",
    "TokenStream",
    "check_draft_vocabulary",
    "collect",
    "load",
]

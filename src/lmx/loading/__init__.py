"""The loading wing, above ``io/``: find a model (a path or the bundled default), convert it, load it.

``io/`` reads file formats; this package turns them into a runnable model and tokenizer. (It is
``loading``, not ``load``: ``lmx.load`` is the engine's entry function.)
"""

from __future__ import annotations

from lmx.loading.find import load_model
from lmx.loading.loader import DTYPES, LoadedModel, resolve_dtype

__all__ = ["DTYPES", "LoadedModel", "load_model", "resolve_dtype"]

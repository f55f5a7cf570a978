"""Checks and small helpers the engine and its loader share: keywords, a draft model's vocabulary, id sets."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from lmx.errors import DraftModelError, InvalidOptionError
from lmx.generate.options import nearest_name
from lmx.loading import LoadedModel

CLASSIFY_OPTIONS = (
    "instruction",
    "examples",
    "batch_size",
    "max_text_tokens",
    "padding_side",
    "chat_template_kwargs",
)


def check_keywords(method: str, given: dict[str, Any], allowed: Sequence[str]) -> None:
    """An unknown keyword is an :class:`InvalidOptionError` naming it and the nearest allowed one."""
    for name in given:
        if name not in allowed:
            close = nearest_name(name, allowed)
            hint = f"; did you mean {close!r}?" if close else ""
            raise InvalidOptionError(f"{method}() got an unknown option {name!r}{hint} (allowed: {', '.join(allowed)})")


def check_draft_vocabulary(target: LoadedModel, draft: LoadedModel) -> None:
    """Check that ``draft`` can draft for ``target``: the same token strings under the same ids.

    Raises:
        DraftModelError: the vocabularies differ (the message names the first difference).
    """
    a = target.tokenizer.backend.get_vocab(with_added_tokens=True)
    b = draft.tokenizer.backend.get_vocab(with_added_tokens=True)
    if a == b:
        return
    where = f"draft model {draft.source} for {target.source}"
    if len(a) != len(b):
        raise DraftModelError(
            f"{where}: the vocabularies differ in size ({len(b)} tokens vs {len(a)}); "
            "a draft model must share the model's tokenizer (Gemma 3 270M for a larger Gemma 3, Qwen 3 0.6B for Qwen 3)"
        )
    token = min((t for t in a if b.get(t) != a[t]), key=lambda t: a[t])
    raise DraftModelError(
        f"{where}: the vocabularies differ: token {token!r} is id {a[token]} in the model and "
        f"{b.get(token)} in the draft model; a draft model must share the model's tokenizer"
    )


def id_set(value: Any) -> frozenset[int]:
    if value is None:
        return frozenset()
    if isinstance(value, int):
        return frozenset({value})
    return frozenset(int(v) for v in value)


def flatten(params: Any) -> list[tuple[str, mx.array]]:
    """A module's parameters as (path, array) pairs."""
    return tree_flatten(params)

"""Streaming detokenization: turn generated ids into text one token at a time.

The detokenizer keeps a small window of ids: the last emitted chunk (context, so decoders
that strip a leading space or merge byte tokens see the same neighbours as in a full decode)
followed by the ids not yet emitted. Each new id decodes only that window, and the text past
the context's own decoding is emitted once it is final (the ``prefix_offset``/``read_offset``
technique of text-generation-inference and vLLM). Text is held back while it ends in U+FFFD
(a UTF-8 character split across tokens) and while a run of byte-fallback tokens is open,
because the ``ByteFallback`` decoder turns a whole run into U+FFFDs when any byte is invalid.

Invariant: the concatenation of every :meth:`StreamingDetokenizer.add_token` result and
:meth:`StreamingDetokenizer.finalize` equals ``tokenizer.decode(tokens)``. To keep the cost
per token bounded, text is not held forever, which only matters for invalid UTF-8: a run of
more than ``max_held_tokens`` byte tokens is emitted at a clean character boundary (a later
invalid byte in the same run then no longer turns the emitted part into U+FFFDs), and text
that still ends in U+FFFD after ``4 * max_held_tokens`` held ids is emitted as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import tokenizers

from lmx.errors import TokenizerError

_REPLACEMENT = "\ufffd"


class DecodingTokenizer(Protocol):
    """What the detokenizer needs of a tokenizer (:class:`lmx.tokenizer.Tokenizer` is one); a Protocol,
    so this module does not import the tokenizer that builds detokenizers."""

    @property
    def backend(self) -> tokenizers.Tokenizer: ...

    @property
    def special_token_ids(self) -> frozenset[int]: ...

    @property
    def byte_fallback_ids(self) -> frozenset[int]: ...

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str: ...

    def check_id(self, token_id: Any) -> int: ...


class StreamingDetokenizer:
    """Incremental text for one generated sequence.

    Args:
        tokenizer: The tokenizer whose ids are streamed.
        skip_special_tokens: Leave special tokens out of the text, as :meth:`Tokenizer.decode` does.
        max_held_tokens: How many ids a byte-fallback run may hold text back before the text is
            emitted at the next clean character boundary.

    Raises:
        TokenizerError: ``max_held_tokens`` is less than 4.
    """

    def __init__(
        self, tokenizer: DecodingTokenizer, *, skip_special_tokens: bool = True, max_held_tokens: int = 16
    ) -> None:
        if max_held_tokens < 4:
            raise TokenizerError(f"max_held_tokens must be >= 4 (one UTF-8 character), got {max_held_tokens}")
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        # Skipped special ids are dropped before the decoder runs, so they never change the text.
        self._ignored = tokenizer.special_token_ids if skip_special_tokens else frozenset()
        self._byte_ids = tokenizer.byte_fallback_ids
        self._soft_limit = max_held_tokens
        self._hard_limit = 4 * max_held_tokens
        self.reset()

    def reset(self) -> None:
        """Forget all tokens and text, to start a new sequence."""
        self._tokens: list[int] = []
        self._window: list[int] = []  # context ids, then ids whose text is not emitted yet
        self._read_offset = 0  # index in _window of the first id not emitted yet
        self._context_text = ""  # decode(_window[:_read_offset])
        self._pieces: list[str] = []

    def piece(self, token_id: int) -> str:
        """The text of one id alone, special tokens spelled out (for ``top_logprobs``)."""
        return self._tokenizer.decode([token_id], skip_special_tokens=False)

    @property
    def tokens(self) -> list[int]:
        """Every id added so far (the list itself: do not modify it)."""
        return self._tokens

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.backend.decode(ids, skip_special_tokens=self._skip_special)

    def add_token(self, token_id: int) -> str:
        """Add one generated id.

        Args:
            token_id: The id.

        Returns:
            The text that became final with this id; often ``""`` when it is held back.

        Raises:
            TokenizerError: the id is not an int or is out of range.
        """
        token_id = self._tokenizer.check_id(token_id)
        self._tokens.append(token_id)
        if token_id in self._ignored:
            return ""
        self._window.append(token_id)
        held = len(self._window) - self._read_offset
        if token_id in self._byte_ids and held < self._soft_limit:
            return ""
        return self._emit(force=held >= self._hard_limit)

    def add_tokens(self, token_ids: list[int]) -> str:
        """Add several ids; returns the text that became final."""
        return "".join([self.add_token(t) for t in token_ids])

    def finalize(self) -> str:
        """Emit whatever text is still held back (call when generation ends).

        Returns:
            The remaining text, possibly ``""``.
        """
        if self._read_offset == len(self._window):
            return ""
        return self._emit(force=True)

    def _emit(self, *, force: bool) -> str:
        window_text = self._decode(self._window)
        start = len(self._context_text)
        if len(window_text) <= start:
            if not force:
                return ""
            piece = ""
        elif window_text.endswith(_REPLACEMENT) and not force:
            return ""
        else:
            piece = window_text[start:]
        # The ids just emitted become the context of the next window.
        del self._window[: self._read_offset]
        self._read_offset = len(self._window)
        self._context_text = self._decode(self._window)
        if piece:
            self._pieces.append(piece)
        return piece

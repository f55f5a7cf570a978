"""Training data: JSONL files of ``text``, ``prompt``/``completion`` or chat ``messages`` records.

Each record becomes an :class:`Example`: its token ids and, per token, whether the model is
trained to predict it. Without ``mask_prompt`` every token but the first is a target; with
it, only completion tokens (``prompt``/``completion``) or assistant turns (``messages``,
rendered with the model's chat template) are. ``text`` and ``completion`` records end with
the EOS token so the model learns to stop. A bad record raises :class:`DatasetError` naming
the file and line.

With ``max_seq_len``, every string of a record (``text``, ``prompt``, ``completion``, each
message's ``content``) is cut to :func:`char_budget` characters *before* tokenizing: no token of
the vocabulary covers more characters than its longest entry, so the cut text still yields the
first ``max_seq_len`` tokens (plus a margin of ``_MARGIN_TOKENS``) and the kept tokens are the
same; tokenizing a 100 MB line in full peaked at 15 GB.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from lmx.errors import LmxError, TokenizerError
from lmx.tokenizer import common_prefix

logger = logging.getLogger(__name__)

FORMATS = ("text", "completion", "chat")
SPLITS = ("train", "valid", "test")
_MARGIN_TOKENS = 64  # cut this many tokens' worth of characters past max_seq_len: the cut stays out of reach


class DatasetError(LmxError, ValueError):
    """A data file is missing, empty or holds a malformed record (named by file and line)."""


@dataclass(frozen=True)
class Example:
    """One training sequence.

    Attributes:
        tokens: token ids, int32 (L,).
        targets: bool (L,): ``targets[i]`` says whether predicting ``tokens[i]`` counts in
            the loss (``targets[0]`` is always False: nothing predicts the first token).
    """

    tokens: np.ndarray
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class Dataset:
    """The examples of one JSONL file."""

    path: str
    format: str
    examples: list[Example]

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def num_tokens(self) -> int:
        return int(sum(len(e) for e in self.examples))


@dataclass(frozen=True)
class Batch:
    """A right-padded batch: the model reads ``inputs`` and is scored on ``targets`` where
    ``weights`` is 1. Arrays are (B, L - 1)."""

    inputs: mx.array
    targets: mx.array
    weights: mx.array
    num_tokens: int  # real (unpadded) tokens in the batch


def _record_format(record: dict[str, Any]) -> str | None:
    if "messages" in record:
        return "chat"
    if "prompt" in record or "completion" in record:
        return "completion"
    if "text" in record:
        return "text"
    return None


def char_budget(tokenizer: Any, max_seq_len: int) -> int:
    """Characters of a string that always yield at least ``max_seq_len`` (+ a margin) tokens.

    A token stands for at most as many characters as its vocabulary entry has (byte-level
    BPE writes one character per byte; SentencePiece one per character; byte-fallback tokens
    stand for part of a character), so ``(max_seq_len + margin) * longest entry`` characters
    hold more tokens than are kept.
    """
    longest = max((len(token) for token in tokenizer.backend.get_vocab(with_added_tokens=True)), default=1)
    return (max_seq_len + _MARGIN_TOKENS) * max(longest, 1)


class _Encoder:
    def __init__(
        self, tokenizer: Any, mask_prompt: bool, template_kwargs: dict[str, Any], max_chars: int | None = None
    ) -> None:
        self.tok = tokenizer
        self.mask_prompt = mask_prompt
        self.template_kwargs = template_kwargs
        self.max_chars = max_chars
        eos = getattr(tokenizer, "eos_token", None)
        eos_id = tokenizer.token_to_id(eos) if eos else None
        if eos_id is None and tokenizer.eos_token_ids:
            eos_id = min(tokenizer.eos_token_ids)
        self.eos_id: int | None = eos_id

    def _cut(self, text: str) -> str:
        """``text`` cut to the character budget (see :func:`char_budget`)."""
        return text if self.max_chars is None or len(text) <= self.max_chars else text[: self.max_chars]

    def _with_eos(self, ids: list[int]) -> list[int]:
        return ids + [self.eos_id] if self.eos_id is not None and (not ids or ids[-1] != self.eos_id) else ids

    def text(self, record: dict[str, Any], where: str) -> tuple[list[int], list[bool]]:
        text = record["text"]
        if not isinstance(text, str) or not text:
            raise DatasetError(f"{where}: 'text' must be a non-empty string, got {text!r:.60}")
        ids = self._with_eos(self.tok.encode(self._cut(text)))
        return ids, [False] + [True] * (len(ids) - 1)

    def completion(self, record: dict[str, Any], where: str) -> tuple[list[int], list[bool]]:
        prompt, completion = record.get("prompt"), record.get("completion")
        for key, value in (("prompt", prompt), ("completion", completion)):
            if not isinstance(value, str):
                raise DatasetError(f"{where}: {key!r} must be a string, got {value!r:.60}")
        if not completion:
            raise DatasetError(f"{where}: 'completion' is empty; there is nothing to learn")
        p = self.tok.encode(self._cut(prompt))
        if self.max_chars is not None and len(prompt) > self.max_chars:
            completion = ""  # the prompt alone fills the sequence: nothing of the completion is kept
        c = self._with_eos(self.tok.encode(self._cut(completion), add_special_tokens=False))
        first = len(p) if self.mask_prompt else 1
        ids = p + c
        return ids, [i >= max(first, 1) for i in range(len(ids))]

    def chat(self, record: dict[str, Any], where: str) -> tuple[list[int], list[bool]]:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DatasetError(f"{where}: 'messages' must be a non-empty list, got {messages!r:.60}")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise DatasetError(f"{where}: messages[{i}] must be an object with a string 'role', got {m!r:.60}")
            if not isinstance(m.get("content"), str):
                raise DatasetError(f"{where}: messages[{i}]['content'] must be a string, got {m.get('content')!r:.60}")
        if self.max_chars is not None:
            messages = [{**m, "content": self._cut(m["content"])} for m in messages]
        tools = record.get("tools")
        kw = dict(self.template_kwargs)
        if tools is not None:
            kw["tools"] = tools

        def render(msgs: list[dict[str, Any]], gen: bool) -> list[int]:
            return self.tok.encode_chat(msgs, add_generation_prompt=gen, **kw)

        try:
            ids = render(messages, False)
            if not self.mask_prompt:
                return ids, [False] + [True] * (len(ids) - 1)
            targets = [False] * len(ids)
            turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
            if not turns:
                raise DatasetError(f"{where}: with mask_prompt a conversation needs an assistant message to learn")
            for i in turns:
                # A template may rewrite earlier turns (Qwen 3 drops old reasoning): only the
                # tokens that the full rendering shares with the turn's own rendering count.
                start = common_prefix(ids, render(messages[:i], True))
                end = common_prefix(ids, render(messages[: i + 1], False))
                for j in range(max(start, 1), end):
                    targets[j] = True
        except TokenizerError as e:
            raise DatasetError(f"{where}: cannot apply the chat template: {e}") from e
        return ids, targets


def load_jsonl(
    path: str | os.PathLike,
    tokenizer: Any,
    *,
    mask_prompt: bool = False,
    max_seq_len: int | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> Dataset:
    """Read and tokenize a JSONL file.

    Args:
        path: the ``.jsonl`` file; one JSON object per line, blank lines skipped.
        tokenizer: an :class:`lmx.tokenizer.Tokenizer`.
        mask_prompt: only completion / assistant tokens are targets.
        max_seq_len: truncate longer examples to this many tokens (logged); each string of a
            record is first cut to :func:`char_budget` characters, which keeps those tokens.
        chat_template_kwargs: extra chat template variables (e.g. ``enable_thinking``).

    Returns:
        The :class:`Dataset`.

    Raises:
        DatasetError: the file is missing or empty; a line is not a JSON object; a record has
            none of the formats, mixes formats with earlier lines, or holds a bad value.
    """
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"data file {p} not found")
    max_chars = None if max_seq_len is None else char_budget(tokenizer, max_seq_len)
    encoder = _Encoder(tokenizer, mask_prompt, dict(chat_template_kwargs or {}), max_chars)
    examples: list[Example] = []
    fmt: str | None = None
    truncated = dropped = 0
    try:
        lines = p.read_text(encoding="utf-8").split("\n")  # not splitlines(): JSON strings may hold U+2028
    except UnicodeDecodeError as e:
        raise DatasetError(f"{p} is not UTF-8 text: {e}") from e
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{p}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{where}: not valid JSON: {e.msg} (column {e.colno})") from e
        except RecursionError as e:  # arrays or objects nested thousands deep
            raise DatasetError(f"{where}: the JSON is nested too deeply (Python's limit is about 1000 levels)") from e
        if not isinstance(record, dict):
            raise DatasetError(f"{where}: each line must be a JSON object, got {type(record).__name__}")
        kind = _record_format(record)
        if kind is None:
            raise DatasetError(
                f"{where}: a record needs 'text', 'prompt' and 'completion', or 'messages'; got keys {sorted(record)}"
            )
        if fmt is None:
            fmt = kind
            if kind == "text" and mask_prompt:
                raise DatasetError(f"{where}: mask_prompt needs prompt/completion or messages records, not 'text'")
        elif kind != fmt:
            raise DatasetError(f"{where}: a {kind!r} record in a file of {fmt!r} records; use one format per file")
        try:
            ids, targets = getattr(encoder, kind)(record, where)
        except TokenizerError as e:
            raise DatasetError(f"{where}: {e}") from e
        if max_seq_len is not None and len(ids) > max_seq_len:
            ids, targets = ids[:max_seq_len], targets[:max_seq_len]
            truncated += 1
        if len(ids) < 2 or not any(targets):
            dropped += 1
            continue
        examples.append(Example(np.asarray(ids, dtype=np.int32), np.asarray(targets, dtype=bool)))
    if fmt is None:
        raise DatasetError(f"{p} holds no records")
    if truncated:
        logger.warning("%s: %d example(s) truncated to %d tokens", p, truncated, max_seq_len)
    if dropped:
        logger.warning("%s: %d example(s) dropped: no target token left after truncation", p, dropped)
    if not examples:
        raise DatasetError(f"{p}: no example has a token to learn (max_seq_len={max_seq_len})")
    return Dataset(str(p), fmt, examples)


def find_split(data: str | os.PathLike, split: str) -> Path | None:
    """The file of ``split`` (train/valid/test) under the data directory, or ``data`` itself
    (for ``train``) when it is a file. None when the split has no file."""
    p = Path(data)
    if p.is_file():
        return p if split == "train" else None
    f = p / f"{split}.jsonl"
    return f if f.is_file() else None


def load_split(data: str | os.PathLike, split: str, tokenizer: Any, **kwargs: Any) -> Dataset | None:
    """Load ``split`` from ``data`` (see :func:`find_split`); None when absent.

    Raises:
        DatasetError: ``data`` does not exist, or the file is bad.
    """
    p = Path(data)
    if not p.exists():
        raise DatasetError(f"data {str(data)!r} not found: give a directory with train.jsonl or a .jsonl file")
    f = find_split(p, split)
    return None if f is None else load_jsonl(f, tokenizer, **kwargs)


# ---------------------------------------------------------------------- batching


def epoch_batches(dataset: Dataset, batch_size: int, epoch: int, seed: int) -> list[list[int]]:
    """The batches (lists of example indices) of one training epoch.

    Examples are sorted by length and cut into runs of ``batch_size`` (little padding); the
    order of the runs is a permutation drawn from ``(seed, epoch)``, so the data order of any
    step can be recomputed exactly on resume. A last, incomplete run is left out.

    Raises:
        DatasetError: the dataset has fewer examples than ``batch_size``.
    """
    if len(dataset) < batch_size:
        raise DatasetError(f"{dataset.path} has {len(dataset)} examples, fewer than batch_size={batch_size}")
    order = sorted(range(len(dataset)), key=lambda i: (len(dataset.examples[i]), i))
    runs = [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    perm = np.random.default_rng([seed, epoch]).permutation(len(runs))
    return [runs[i] for i in perm]


def eval_batches(dataset: Dataset, batch_size: int) -> list[list[int]]:
    """All examples, sorted by length, in batches of ``batch_size`` (the last may be short)."""
    order = sorted(range(len(dataset)), key=lambda i: (len(dataset.examples[i]), i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def collate(examples: Sequence[Example], pad_id: int = 0) -> Batch:
    """Right-pad ``examples`` into a :class:`Batch` (padding gets weight 0)."""
    length = max(len(e) for e in examples)
    tokens = np.full((len(examples), length), pad_id, dtype=np.int32)
    targets = np.zeros((len(examples), length), dtype=np.float32)
    for row, e in enumerate(examples):
        tokens[row, : len(e)] = e.tokens
        targets[row, : len(e)] = e.targets
    return Batch(
        inputs=mx.array(tokens[:, :-1]),
        targets=mx.array(tokens[:, 1:]),
        weights=mx.array(targets[:, 1:]),
        num_tokens=int(sum(len(e) for e in examples)),
    )

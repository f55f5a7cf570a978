"""Sort texts into labels by the model's probability of each label as its whole answer.

Every text is put to the model as a chat: an instruction, optional worked examples (as
earlier turns), then the text. A label's score is the probability that the assistant
answers with exactly that label: its tokens followed by the token that ends the turn
(``<end_of_turn>``, ``<|im_end|>``...), so labels that share leading tokens, or where one
is a prefix of another, are still told apart. Scores are normalised over the labels.

How one call runs:

1. The tokens every text's prompt starts with (template header, instruction, examples)
   run once; their keys/values are broadcast to every row of each batch.
2. Stage 1: each text's own tokens (text, end of turn, assistant header) run in one
   padded pass over that prefix; each row's last token predicts every label's first token.
3. Stage 2: the answers form a trie of token prefixes; each distinct prefix (node) is fed
   once per text, as one token at its own position that sees the text and its ancestors.
   A text's nodes are rows up to attention and one sequence through it, so the text's
   keys/values are joined once per pass, never copied per label.
4. The LM head runs once per (text, node); from its logits only the log-probabilities of
   the answers' next tokens are taken (one gather), and summed along each answer.

Work therefore grows with the distinct label tokens, in passes bounded by
``BRANCH_TOKENS``, ``STAGE2_SCORES`` and ``HEAD_ROWS``.

Rows end at different places, so the caches here keep the position of every key and give
RoPE a per-row offset; attention masks are built from those positions. Padding (on
either side), prefix sharing and batching therefore change nothing but float rounding.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

import numpy as np

from lmx.classify_score import Scorer
from lmx.errors import ContextLengthError, InvalidOptionError, TokenizerError
from lmx.results import GenerationMetrics
from lmx.runtime import memory
from lmx.tokenizer import common_prefix


class ClassifyEngine(Protocol):
    """What :func:`classify` needs of an engine (:class:`lmx.Engine` is one)."""

    model: Any
    tokenizer: Any
    context_length: int
    prefill_step_size: int
    metrics: GenerationMetrics

    def run_exclusive(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` with the model to itself; return its result."""


logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 16
"""Texts per batch when none is given."""

Example = tuple[str, str] | Mapping[str, str]
"""A worked example: ``(text, label)`` or ``{"text": ..., "label": ...}``."""

_SENTINEL = "\u2063lmx-classify-text\u2063"  # stands in for the text to find where it sits in the prompt
_BATCH_POSITIONS = 16384  # most rows x positions in one batch: bounds the keys/values of long texts


@dataclass(frozen=True)
class Classification:
    """The result for one text.

    Attributes:
        label: the most probable label (the first of them on a tie).
        scores: label -> probability of that answer, normalised over the labels (sums to 1).
        logprobs: label -> log-probability of the whole answer (label tokens and the
            end-of-turn token) given the prompt, before normalising.
        truncated: the text was cut to fit the context (or ``max_text_tokens``).
    """

    label: str
    scores: dict[str, float]
    logprobs: dict[str, float]
    truncated: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_instruction(labels: Sequence[str]) -> str:
    """The instruction used when none is given."""
    return (
        f"Classify the text into exactly one of these categories: {', '.join(labels)}. "
        "Answer with the category name only."
    )


def build_messages(
    text: str,
    labels: Sequence[str],
    *,
    instruction: str | None = None,
    examples: Sequence[Example] | None = None,
) -> list[dict[str, str]]:
    """The conversation :func:`classify` scores for ``text``: one user turn per example
    (answered by its label), then the text's user turn.

    Each user turn reads ``"{instruction}\\n\\nText:\\n{text}"``.
    """
    head = instruction if instruction is not None else default_instruction(labels)
    messages: list[dict[str, str]] = []
    for ex_text, ex_label in _example_pairs(examples):
        messages.append({"role": "user", "content": f"{head}\n\nText:\n{ex_text}"})
        messages.append({"role": "assistant", "content": ex_label})
    messages.append({"role": "user", "content": f"{head}\n\nText:\n{text}"})
    return messages


def classify(
    engine: ClassifyEngine,
    texts: Sequence[str],
    labels: Sequence[str],
    *,
    instruction: str | None = None,
    examples: Sequence[Example] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_text_tokens: int | None = None,
    padding_side: Literal["right", "left"] = "right",
    chat_template_kwargs: dict[str, Any] | None = None,
) -> list[Classification]:
    """Classify every text into one of ``labels``.

    A text too long for the context (with the prompt around it and the longest answer)
    is not an error: its end is cut off so that it fits, a warning is logged, and its
    result has ``truncated=True``. ``max_text_tokens`` cuts texts shorter still, on
    purpose (faster; the start of a text usually tells its domain); those are flagged
    too, without a warning.

    Args:
        engine: the engine whose model scores the labels; it is held for the whole call.
        texts: the texts (non-empty strings).
        labels: the candidate answers (distinct, non-empty strings).
        instruction: what the model is told before each text; default:
            :func:`default_instruction`.
        examples: worked examples ``(text, label)`` shown as earlier turns of the chat;
            their labels must be among ``labels``.
        batch_size: texts per forward pass (results do not depend on it).
        max_text_tokens: cut every text to at most this many tokens (None: no cut, but
            the context length).
        padding_side: where rows are padded; results do not depend on it (it exists so
            that tests can show that).
        chat_template_kwargs: extra chat template variables; ``enable_thinking`` is
            False unless given (Qwen 3 would otherwise think before answering).

    Returns:
        One :class:`Classification` per text, in order.

    Raises:
        InvalidOptionError: empty or duplicate labels, an empty text, an example whose
            label is not a label, or a bad batch_size / max_text_tokens / padding_side.
        ContextLengthError: the instruction and examples alone leave no room for a text.
        TokenizerError: the model has no chat template, or it does not write the text
            verbatim.
        EngineClosedError: the engine is closed.
    """
    labels = validate_labels(labels)
    texts = _check_texts(texts)
    shots = _check_examples(examples, labels)
    if instruction is not None and not isinstance(instruction, str):
        raise InvalidOptionError(f"instruction must be a string or None, got {type(instruction).__name__}")
    _check_positive("batch_size", batch_size)
    if max_text_tokens is not None:
        _check_positive("max_text_tokens", max_text_tokens)
    if padding_side not in ("right", "left"):
        raise InvalidOptionError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if not texts:
        return []
    template_kwargs = {"enable_thinking": False, **(chat_template_kwargs or {})}

    def work() -> tuple[np.ndarray, list]:
        t0 = time.perf_counter()
        memory.reset_peak()
        model, tokenizer = engine.model, engine.tokenizer
        plan = _Plan(tokenizer, labels, instruction, shots, template_kwargs)
        rows, truncated = plan.encode_texts(texts, engine.context_length, max_text_tokens)
        scorer = Scorer(model, plan.answers, tokenizer.pad_token_id or 0, engine.prefill_step_size, padding_side)
        scorer.run_prefix(plan.prefix)
        logprobs = np.zeros((len(texts), len(labels)))
        for batch in _batches([len(plan.prefix) + len(seg) for _, seg in rows], batch_size):
            logprobs[batch] = scorer.score([rows[i] for i in batch])
        elapsed = time.perf_counter() - t0
        n_tokens = sum(base + len(seg) for base, seg in rows)
        engine.metrics = GenerationMetrics(
            prompt_tokens=n_tokens,
            cached_tokens=sum(base for base, _ in rows) - len(plan.prefix),
            total_time=elapsed,
            prefill_tokens_per_s=n_tokens / max(elapsed, 1e-9),
            peak_memory=memory.peak(),
            active_memory=memory.active(),
        )
        return logprobs, truncated

    # The scheduler runs it between two decode steps, with the model to itself.
    logprobs, truncated = engine.run_exclusive(work)

    cut = [i for i, t in enumerate(truncated) if t == "context"]
    if cut:
        logger.warning(
            "%d of %d texts did not fit the context length %d and were cut to fit (indices %s)",
            len(cut),
            len(texts),
            engine.context_length,
            cut[:10] if len(cut) <= 10 else f"{cut[:10]}...",
        )
    return [_result(labels, row, bool(flag)) for row, flag in zip(logprobs, truncated)]


# --------------------------------------------------------------------------- validation
def validate_labels(labels: Sequence[str]) -> list[str]:
    """Check ``labels`` as :func:`classify` does, and return them as a list.

    Raises:
        InvalidOptionError: not a list of strings, empty, an empty label or a duplicate.
    """
    if isinstance(labels, str) or not isinstance(labels, Sequence):
        raise InvalidOptionError(f"labels must be a list of strings, got {type(labels).__name__}")
    if not labels:
        raise InvalidOptionError("labels is empty: give at least one label")
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):
        if not isinstance(label, str):
            raise InvalidOptionError(f"labels[{i}] must be a string, got {type(label).__name__}")
        if not label.strip():
            raise InvalidOptionError(f"labels[{i}] is empty ({label!r}); every label needs visible text")
        if label in seen:
            raise InvalidOptionError(f"labels[{i}] {label!r} duplicates labels[{seen[label]}]; labels must be distinct")
        seen[label] = i
    return list(labels)


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise InvalidOptionError(
            f"texts must be a list of strings, got {type(texts).__name__}; wrap a single text in a list"
        )
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidOptionError(f"texts[{i}] must be a string, got {type(text).__name__}")
        if not text.strip():
            raise InvalidOptionError(f"texts[{i}] is empty ({text!r}); every text needs visible text")
    return list(texts)


def _example_pairs(examples: Sequence[Example] | None) -> list[tuple[str, str]]:
    pairs = []
    for i, ex in enumerate(examples or ()):
        if isinstance(ex, Mapping):
            if set(ex) != {"text", "label"}:
                raise InvalidOptionError(
                    f"examples[{i}] must have exactly the keys 'text' and 'label', got {sorted(ex)}"
                )
            pair = (ex["text"], ex["label"])
        elif isinstance(ex, Sequence) and not isinstance(ex, str) and len(ex) == 2:
            pair = (ex[0], ex[1])
        else:
            raise InvalidOptionError(f"examples[{i}] must be a (text, label) pair or a dict, got {ex!r}")
        if not all(isinstance(p, str) for p in pair):
            raise InvalidOptionError(f"examples[{i}] must hold strings, got {pair!r}")
        pairs.append(pair)
    return pairs


def _check_examples(examples: Sequence[Example] | None, labels: list[str]) -> list[tuple[str, str]]:
    if examples is not None and (isinstance(examples, (str, Mapping)) or not isinstance(examples, Sequence)):
        raise InvalidOptionError(f"examples must be a list of (text, label) pairs, got {type(examples).__name__}")
    pairs = _example_pairs(examples)
    for i, (text, label) in enumerate(pairs):
        if not text.strip():
            raise InvalidOptionError(f"examples[{i}] has an empty text")
        if label not in labels:
            raise InvalidOptionError(f"examples[{i}] has the label {label!r}, which is not one of {labels}")
    return pairs


def _check_positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidOptionError(f"{name} must be an integer >= 1, got {value!r}")


# --------------------------------------------------------------------------- prompts
class _Plan:
    """Token ids of the shared prefix, of each text's prompt, and of each label's answer."""

    def __init__(
        self,
        tokenizer: Any,
        labels: list[str],
        instruction: str | None,
        shots: list[tuple[str, str]],
        template_kwargs: dict[str, Any],
    ) -> None:
        self.tokenizer = tokenizer
        self.labels, self.instruction, self.shots, self.kwargs = labels, instruction, shots, template_kwargs
        rendered = tokenizer.apply_chat_template(self._messages(_SENTINEL), add_generation_prompt=True, **self.kwargs)
        if rendered.count(_SENTINEL) != 1:
            raise TokenizerError(
                "the chat template does not write the user's text verbatim once, so the prompt cannot be "
                "split around it; pass a chat template that does"
            )
        before, after = rendered.split(_SENTINEL)
        self.prefix: list[int] = tokenizer.encode(before, add_special_tokens=False)
        self.suffix: list[int] = tokenizer.encode(after, add_special_tokens=False)
        end = self._end_of_answer()
        self.answers = [tokenizer.encode(label, add_special_tokens=False) + end for label in labels]

    def _messages(self, text: str) -> list[dict[str, str]]:
        return build_messages(text, self.labels, instruction=self.instruction, examples=self.shots)

    def _end_of_answer(self) -> list[int]:
        """The token the template closes an assistant turn with, else EOS, else nothing."""
        tok, probe = self.tokenizer, "lmx"
        messages = self._messages("x")
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, **self.kwargs)
        full = tok.apply_chat_template(
            [*messages, {"role": "assistant", "content": probe}], add_generation_prompt=False, **self.kwargs
        )
        if full.startswith(prompt + probe):
            after = tok.encode(full[len(prompt) + len(probe) :], add_special_tokens=False)
            if after and after[0] in tok.special_token_ids | tok.eos_token_ids:
                return after[:1]
        eos = tok.token_to_id(tok.eos_token) if tok.eos_token is not None else None
        if eos is None:
            logger.debug("no end-of-turn or EOS token: answers are scored without an end token")
        return [] if eos is None else [eos]

    def encode_texts(
        self, texts: list[str], context_length: int, max_text_tokens: int | None
    ) -> tuple[list[tuple[int, list[int]]], list[str | None]]:
        """Per text ``(shared, own)``: how many leading prompt tokens equal the prefix, and
        the prompt tokens after them; and per text why it was cut (None, "limit", "context")."""
        longest_answer = max(len(a) for a in self.answers)
        fits = context_length - longest_answer + 1  # the last answer token is predicted, not fed
        rows, truncated = [], []
        for text in texts:
            ids = self.tokenizer.encode_chat(self._messages(text), add_generation_prompt=True, **self.kwargs)
            shared = common_prefix(ids, self.prefix)
            tail = len(self.suffix) if self.suffix and ids[-len(self.suffix) :] == self.suffix else 0
            n_text = len(ids) - shared - tail
            keep, why = n_text, None
            if max_text_tokens is not None and n_text > max_text_tokens:
                keep, why = max_text_tokens, "limit"
            if shared + keep + tail > fits:
                keep, why = fits - shared - tail, "context"
                if keep < 1 or not tail:
                    raise ContextLengthError(
                        f"a prompt of {len(ids)} tokens does not fit the context length {context_length} "
                        f"with the longest answer ({longest_answer} tokens)"
                        + (
                            f"; the instruction and examples alone take {shared + tail} tokens"
                            if tail
                            else " and the end of the text cannot be found in the prompt to cut it"
                        )
                    )
            if why is not None:
                ids = ids[: shared + keep] + self.suffix
            rows.append((shared, ids[shared:]))
            truncated.append(why)
        return rows, truncated


def _batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices in batches of similar lengths (less padding), each at most ``batch_size``
    rows and, unless it is one row, at most ``_BATCH_POSITIONS`` cached positions."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    for i in order:
        batch = batches[-1] if batches else None
        if batch is None or len(batch) == batch_size or (len(batch) + 1) * lengths[i] > _BATCH_POSITIONS:
            batches.append([i])
        else:
            batch.append(i)
    return batches


def _result(labels: list[str], logprobs: np.ndarray, truncated: bool) -> Classification:
    probs = np.exp(logprobs - logprobs.max())
    probs /= probs.sum()
    best = int(np.argmax(logprobs))
    return Classification(
        label=labels[best],
        scores={label: float(p) for label, p in zip(labels, probs)},
        logprobs={label: float(v) for label, v in zip(labels, logprobs)},
        truncated=truncated,
    )


__all__ = [
    "DEFAULT_BATCH_SIZE",
    "Classification",
    "build_messages",
    "classify",
    "default_instruction",
    "validate_labels",
]

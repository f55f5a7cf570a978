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
``_BRANCH_TOKENS``, ``_STAGE2_SCORES`` and ``_HEAD_ROWS``.

Rows end at different places, so the caches here keep the position of every key and give
RoPE a per-row offset; attention masks are built from those positions. Padding (on
either side), prefix sharing and batching therefore change nothing but float rounding.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

import mlx.core as mx
import numpy as np

from lmx.errors import ContextLengthError, InvalidOptionError, TokenizerError
from lmx.models.ragged_cache import JoinedCache, Positions, RaggedCache, join_rows, split_rows
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
_HEAD_ROWS = 256  # rows per LM-head call: bounds the (rows, vocab) logits
_BRANCH_TOKENS = 512  # most trie nodes in a stage-2 pass (they attend to each other: its mask grows with the square)
_STAGE2_SCORES = 2**24  # most (query, key) pairs of a stage-2 pass: bounds its attention scores and masks
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
        scorer = _Scorer(model, plan.answers, tokenizer.pad_token_id or 0, engine.prefill_step_size, padding_side)
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


# --------------------------------------------------------------------------- scoring
class _Trie:
    """The answers as a trie of token prefixes, so that each distinct prefix is fed and scored once.

    A label's log-probability is the sum over its answer's tokens of log P(token | prompt and
    the tokens before it). Each distinct context (a node: a strict prefix of some answer, the
    empty one included) needs one hidden state and one LM-head row per text; each distinct
    (node, next token) pair (an edge) one gathered log-probability. Stage 2 feeds every node
    but the root as one token that sees the text and the node's ancestors.
    """

    def __init__(self, answers: list[list[int]]) -> None:
        nodes: dict[tuple[int, ...], int] = {(): 0}
        edges: dict[tuple[int, int], int] = {}
        paths = []
        for answer in answers:
            parents = [nodes.setdefault(tuple(answer[:k]), len(nodes)) for k in range(len(answer))]
            paths.append([edges.setdefault(edge, len(edges)) for edge in zip(parents, answer)])
        self.nodes = nodes
        self.edge_node = np.array([n for n, _ in edges], dtype=np.int64)  # (E,)
        self.edge_token = np.array([t for _, t in edges], dtype=np.int64)
        width = max(len(p) for p in paths)
        self.label_edges = np.array([p + [len(edges)] * (width - len(p)) for p in paths])  # pad: an edge worth 0

    def passes(self, budget: int) -> list[list[tuple[tuple[int, ...], bool]]]:
        """The non-root nodes in passes of at most ``budget`` nodes (more only where a node's
        ancestors alone exceed it), each pass closed under ancestors: ``(prefix, owned)``,
        where an ancestor repeated from an earlier pass is not owned (its hidden state is
        taken from that one). Depth-first order keeps the repeats few."""
        passes: list[list[tuple[tuple[int, ...], bool]]] = []
        members: set[tuple[int, ...]] = set()
        for prefix in sorted(p for p in self.nodes if p):
            missing = [prefix[:k] for k in range(1, len(prefix)) if prefix[:k] not in members]
            if not passes or (members and len(passes[-1]) + len(missing) + 1 > budget):
                passes.append([])
                members = set()
                missing = [prefix[:k] for k in range(1, len(prefix))]
            passes[-1] += [(p, False) for p in missing] + [(prefix, True)]
            members.update(missing, [prefix])
        return passes


class _Scorer:
    """Runs the shared prefix once, then scores batches of texts against every answer."""

    def __init__(self, model: Any, answers: list[list[int]], pad_id: int, step: int, side: str) -> None:
        self.model, self.pad_id, self.step, self.side = model, pad_id, step, side
        self.trie = _Trie(answers)
        self.windows = [getattr(c, "window", None) for c in model.make_cache()]
        self.prefix_len = 0
        self.prefix_kv: list[tuple[mx.array, mx.array]] = []

    def run_prefix(self, prefix: list[int]) -> None:
        """Compute the keys/values of the tokens every prompt starts with."""
        self.prefix_len = len(prefix)
        self.prefix_kv = []
        if prefix:
            positions = Positions(mx.zeros((1, 0), mx.int32), mx.zeros((1, 0), mx.bool_))
            caches = [RaggedCache(positions, w) for w in self.windows]
            self._feed(caches, positions, [prefix], mx.array([0], dtype=mx.int32), want_last=False)
            self.prefix_kv = [(c.keys, c.values) for c in caches]
            mx.eval(self.prefix_kv)

    def score(self, rows: list[tuple[int, list[int]]]) -> np.ndarray:
        """(B, n_labels) log-probabilities of every answer after each row's prompt."""
        n_rows, trie = len(rows), self.trie
        shared = mx.array([s for s, _ in rows], dtype=mx.int32)
        kpos = mx.broadcast_to(mx.arange(self.prefix_len, dtype=mx.int32)[None], (n_rows, self.prefix_len))
        positions = Positions(kpos, kpos < shared[:, None])
        caches = [RaggedCache(positions, w) for w in self.windows]
        for cache, (keys, values) in zip(caches, self.prefix_kv):
            cache.keys = mx.broadcast_to(keys, (n_rows, *keys.shape[1:]))  # (B, n_kv, P, D)
            cache.values = mx.broadcast_to(values, (n_rows, *values.shape[1:]))
        # Stage 1: each text's own tokens; the last one's hidden state is the trie's root.
        hidden = [self._feed(caches, positions, [seg for _, seg in rows], shared, want_last=True)]  # (B, H)
        where = np.zeros((n_rows, len(trie.nodes)), dtype=np.int64)  # row of `hidden` holding (text, node)
        where[:, 0] = np.arange(n_rows)
        if len(trie.nodes) > 1:
            mx.eval(hidden, [(c.keys, c.values) for c in caches])
            ends = shared + mx.array([len(seg) for _, seg in rows], dtype=mx.int32)
            count = n_rows
            for texts, h, nodes in self._feed_nodes(caches, positions, ends):
                where[np.ix_(texts, nodes)] = count + np.arange(h.shape[0]).reshape(len(texts), len(nodes))
                count += h.shape[0]
                hidden.append(h)
        return self._head_logprobs(mx.concatenate(hidden), where)

    def _feed_nodes(
        self, caches: list[RaggedCache], positions: Positions, ends: mx.array
    ) -> Iterator[tuple[np.ndarray, mx.array, np.ndarray]]:
        """Stage 2: run the trie's nodes after every text, a block of (texts, nodes) at a time;
        yield per block the texts, the hidden states of the nodes it owns ((texts x nodes, H),
        text-major) and those nodes."""
        n_texts, n_keys, trie = ends.shape[0], positions.kpos.shape[1], self.trie
        for members in trie.passes(_BRANCH_TOKENS):
            n = len(members)
            index = {prefix: i for i, (prefix, _) in enumerate(members)}
            sees = np.zeros((n, n), dtype=bool)  # (query, key): a node sees itself and its ancestors
            for i, (prefix, _) in enumerate(members):
                sees[i, [index[prefix[:k]] for k in range(1, len(prefix) + 1)]] = True
            depth = np.array([len(prefix) - 1 for prefix, _ in members], dtype=np.int32)
            tokens = [prefix[-1] for prefix, _ in members]
            owned = np.array([i for i, (_, own) in enumerate(members) if own])
            nodes = np.array([trie.nodes[members[i][0]] for i in owned])
            step = max(1, min(n_texts, _STAGE2_SCORES // (n * (n_keys + n))))
            for t0 in range(0, n_texts, step):
                t1 = min(n_texts, t0 + step)
                h = self._run_joined(caches, positions, ends[t0:t1], t0, tokens, depth, sees)  # (rows, 1, H)
                at = (np.arange(t1 - t0)[:, None] * n + owned[None]).ravel()
                picked = h[mx.array(at), 0]  # (texts x nodes, H)
                mx.eval(picked)
                yield np.arange(t0, t1), picked, nodes

    def _run_joined(
        self,
        caches: list[RaggedCache],
        positions: Positions,
        ends: mx.array,
        t0: int,
        tokens: list[int],
        depth: np.ndarray,
        sees: np.ndarray,
    ) -> mx.array:
        """Final hidden states (texts x nodes, 1, H) of trie nodes after each text ``t0..``: the
        layers run one by one (the split :mod:`lmx.generate.segments` uses), each node a row of
        one token up to attention (RoPE at its own position), each text's nodes one sequence
        through it, each seeing the text and its ancestors."""
        n_texts, n = ends.shape[0], len(tokens)
        kpos = positions.kpos[t0 : t0 + n_texts][:, None, :]  # (texts, 1, S)
        kvalid = positions.kvalid[t0 : t0 + n_texts][:, None, :]
        col = mx.array(depth)  # (T,) distance of each node from the text's end
        qpos = (ends[:, None] + col[None])[:, :, None]  # (texts, T, 1)
        own = mx.array(sees)  # (T, T)
        masks: dict[int | None, mx.array] = {}
        for window in set(self.windows):
            text_part, own_part = kvalid & (kpos <= qpos), own
            if window is not None:
                text_part = text_part & (qpos - kpos < window)
                own_part = own & (col[:, None] - col[None, :] < window)
            own_part = mx.broadcast_to(own_part[None], (n_texts, n, n))
            masks[window] = mx.concatenate([text_part, own_part], axis=2)[:, None]  # (texts, 1, T, S + T)
        offset = (ends[:, None] + col[None]).reshape(-1)  # (rows,) RoPE position of each node
        text_model = self.model.model
        h = text_model.embed(mx.array(tokens * n_texts)[:, None])  # (rows, 1, dim)
        for layer, cache in zip(self.model.layers, caches):
            q, k, v = layer.begin(h, offset)  # (rows, heads, 1, head_dim)
            q, k, v = (join_rows(x, n_texts) for x in (q, k, v))  # (texts, heads, T, head_dim)
            joined = JoinedCache(cache.keys[t0 : t0 + n_texts], cache.values[t0 : t0 + n_texts], masks[cache.window])
            out = layer.self_attn.attend(q, k, v, joined, None)
            h = layer.end(h, split_rows(out, n, 1))
        return text_model.norm(h)

    def _head_logprobs(self, hidden: mx.array, where: np.ndarray) -> np.ndarray:
        """Sum log P(token) over each (text, answer)'s edges. The LM head runs on every
        (text, node) once, in blocks of rows (on a CPU each call reads all its weights); from
        each block's logits only the needed log-probabilities are taken, with one gather."""
        trie = self.trie
        row = where[:, trie.edge_node]  # (B, E): the hidden row of each (text, edge)
        order = np.argsort(row, axis=None, kind="stable")
        flat_rows, flat_tokens = row.ravel()[order], np.tile(trie.edge_token, row.shape[0])[order]
        bounds = np.searchsorted(flat_rows, np.arange(0, hidden.shape[0] + _HEAD_ROWS, _HEAD_ROWS))
        logsumexp = self.model.ops.logsumexp  # on lmx's CPU kernels one vectorised op, ~15x MLX's on the CPU
        parts = []
        for i, c in enumerate(range(0, hidden.shape[0], _HEAD_ROWS)):
            lo, hi = bounds[i], bounds[i + 1]
            logits = self.model.head(hidden[None, c : c + _HEAD_ROWS])[0].astype(mx.float32)  # (rows, V)
            local, tokens = mx.array(flat_rows[lo:hi] - c), mx.array(flat_tokens[lo:hi])
            parts.append(logits[local, tokens] - logsumexp(logits)[local, 0])
            mx.eval(parts[-1])
        values = np.empty(row.size)
        values[order] = np.array(mx.concatenate(parts).tolist(), dtype=np.float64)
        edge_logprobs = np.concatenate([values.reshape(row.shape), np.zeros((row.shape[0], 1))], axis=1)
        return edge_logprobs[:, trie.label_edges].sum(axis=-1)  # (B, n_labels)

    def _pad(self, seqs: list[list[int]], start: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Pad ``seqs`` to one length: (tokens, valid, RoPE offset of column 0 per row)."""
        width = max(1, max(len(s) for s in seqs))
        pads = [width - len(s) for s in seqs]
        if self.side == "left":
            tokens = [[self.pad_id] * p + s for p, s in zip(pads, seqs)]
            valid = [[False] * p + [True] * len(s) for p, s in zip(pads, seqs)]
            start = start - mx.array(pads, dtype=mx.int32)
        else:
            tokens = [s + [self.pad_id] * p for p, s in zip(pads, seqs)]
            valid = [[True] * len(s) + [False] * p for p, s in zip(pads, seqs)]
        return mx.array(tokens), mx.array(valid), start.astype(mx.int32)

    def _feed(
        self,
        caches: list[RaggedCache],
        positions: Positions,
        seqs: list[list[int]],
        start: mx.array,
        *,
        want_last: bool,
    ) -> mx.array | None:
        """Run padded ``seqs`` through the model in chunks; return each row's last real hidden state."""
        tokens, qvalid, start = self._pad(seqs, start)
        width = tokens.shape[1]
        last = mx.array([width - 1 if self.side == "left" else len(s) - 1 for s in seqs])
        out = None
        for c in range(0, width, self.step):
            chunk = tokens[:, c : c + self.step]
            positions.add(start + c, qvalid[:, c : c + self.step])
            h = self.model.hidden(chunk, caches)  # (B, L, H)
            if want_last:
                n = chunk.shape[1]
                here = (last >= c) & (last < c + n)
                picked = mx.take_along_axis(h, mx.clip(last - c, 0, n - 1)[:, None, None], axis=1)[:, 0]
                out = picked if out is None else mx.where(here[:, None], picked, out)
            if c + self.step < width:
                mx.eval([(cc.keys, cc.values) for cc in caches], out if out is not None else [])
        return out


__all__ = [
    "DEFAULT_BATCH_SIZE",
    "Classification",
    "build_messages",
    "classify",
    "default_instruction",
    "validate_labels",
]

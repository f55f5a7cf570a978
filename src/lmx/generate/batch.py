"""Padded batch generation: one left-padded batch, per-row stop, limit and finish_reason.

:func:`batch_generate` returns every row's :class:`Completion`; :func:`stream_batch` runs
several not-yet-started :class:`lmx.TokenStream` objects as one batch (the server uses it
to serve concurrent requests together) and yields each row's tokens as they are made.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import fields
from typing import TYPE_CHECKING

import mlx.core as mx

from lmx import memory
from lmx.generate.options import GenerationOptions
from lmx.generate.sampling import KeySequence, make_logits_processors, make_sampler, top_logprobs
from lmx.generate.step import generate_step
from lmx.generate.stopping import StopStringMatcher
from lmx.results import Completion, GenerationMetrics, Token

if TYPE_CHECKING:
    from lmx.engine import Engine, TokenStream

# Options each row of a batch may set for itself; every other option is shared by the batch.
ROW_OPTIONS = frozenset({"max_tokens", "stop"})


def batch_key(opts: GenerationOptions) -> tuple | None:
    """What requests must share to run in one batch; None: this one runs alone.

    The sampler, the logits processors and ``logprobs`` are one per batch. A seeded request
    that samples runs alone: its random draws would depend on its batch-mates.
    """
    if opts.seed is not None and opts.temperature > 0:
        return None
    return tuple(repr(getattr(opts, f.name)) for f in fields(opts) if f.name not in ROW_OPTIONS and f.name != "seed")


def batch_generate(engine: Engine, prompts: list[list[int]], opts: GenerationOptions) -> list[Completion]:
    """Generate for every prompt in one batch; rows that finish early are masked out of the output.

    Rows are left-padded; padded key positions are masked in every layer, so a row's
    result does not depend on the others (up to float rounding). Each row stops on its
    own: at a stop id or string, at ``max_tokens``, or where its prompt plus its output
    reach the context length.
    """
    if not prompts:
        return []
    batch = _Batch(engine, prompts, opts, [opts] * len(prompts))
    for _ in batch:
        pass
    return [
        Completion(row.text, row.tokens, row.finish or "length", batch.metrics(i), row.logprobs, row.top(opts))
        for i, row in enumerate(batch.rows)
    ]


def stream_batch(
    engine: Engine, streams: list[TokenStream], cancelled: Callable[[int], bool] = lambda i: False
) -> Iterator[tuple[int, Token]]:
    """Run not-yet-started streams of ``engine`` (same :func:`batch_key`) as one batch.

    Yields ``(index, token)`` as the rows make tokens; each stream's ``text``, ``tokens``,
    ``finish_reason`` and ``metrics`` end as if it had run alone. A row for which
    ``cancelled(index)`` turns true gets no more tokens; the batch ends when every row has
    finished or been cancelled. Holds the engine while it runs, like any generation.
    """
    requests = [s.request for s in streams]
    if any(r is None for r in requests):
        raise ValueError("stream_batch needs streams made by Engine.stream / stream_chat")
    for s in streams:
        s.close()  # not started: only its generator is dropped; the batch runs in its place
    with engine._busy():
        engine._cache, engine._cache_tokens = None, []
        batch = _Batch(engine, [ids for ids, _ in requests], requests[0][1], [opts for _, opts in requests])
        try:
            for i, token in batch:
                if cancelled(i):
                    batch.drop(i)
                    continue
                streams[i]._record(token)
                if token.finish_reason is not None:  # metrics are read as soon as a stream ends
                    _set_metrics(streams[i].metrics, batch.metrics(i))
                yield i, token
        finally:
            batch.close()
            for i, s in enumerate(streams):
                if s.finish_reason is None:
                    _set_metrics(s.metrics, batch.metrics(i))


class _Batch:
    """One left-padded batch: iterate it for ``(row, token)``; rows hold the results."""

    def __init__(
        self, engine: Engine, prompts: list[list[int]], opts: GenerationOptions, row_opts: list[GenerationOptions]
    ) -> None:
        self.engine, self.prompts, self.opts = engine, prompts, opts
        tokenizer = engine.tokenizer
        self.rows = [
            _Row(
                tokenizer.detokenizer(),
                StopStringMatcher(s for s in o.stop if isinstance(s, str)),
                engine._eos | {s for s in o.stop if isinstance(s, int)},
                min(o.max_tokens, engine.context_length - len(p)),
            )
            for p, o in zip(prompts, row_opts)
        ]
        self.t0 = self.t_first = self.t_end = time.perf_counter()
        self._steps: Iterator | None = None

    def __iter__(self) -> Iterator[tuple[int, Token]]:
        engine, opts, prompts = self.engine, self.opts, self.prompts
        longest = max(len(p) for p in prompts)
        pad_id = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else 0
        pads = [longest - len(p) for p in prompts]
        tokens = mx.array([[pad_id] * n + p for n, p in zip(pads, prompts)])  # (B, L)
        processors = make_logits_processors(opts, prompt_len=longest)
        # The processors see each row's first token where the padding is: the repetition
        # penalty counts a token once, so that changes nothing, where pad ids would be penalised.
        history = mx.array([[p[0]] * n + p for n, p in zip(pads, prompts)]) if processors else None
        cache = engine.model.make_cache()
        engine._check_kv_memory(cache, longest + 1, len(prompts))
        memory.reset_peak()
        self.t0 = time.perf_counter()
        self._steps = generate_step(
            engine.model,
            tokens,
            cache,
            make_sampler(opts.temperature, opts.top_k, opts.top_p, opts.min_p),
            KeySequence(opts.seed).next,
            history=history,
            processors=processors,
            pad=mx.array(pads) if any(pads) else None,
            prefill_step_size=engine.prefill_step_size,
            state=engine.decode_state,
        )
        try:
            for step, (token, logprobs) in enumerate(self._steps):
                ids = token.tolist()
                self.t_end = time.perf_counter()
                if step == 0:
                    self.t_first = self.t_end
                chosen = mx.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0].tolist()
                tops: list = [None] * len(self.rows)
                if opts.logprobs:
                    top_ids, top_vals = top_logprobs(logprobs, opts.logprobs)
                    tops = [tuple(zip(i, v)) for i, v in zip(top_ids.tolist(), top_vals.tolist())]
                for i, (row, tid, lp, top) in enumerate(zip(self.rows, ids, chosen, tops)):
                    if not row.done:
                        yield i, row.add(tid, lp, top, step + 1 >= row.limit)
                if all(r.done for r in self.rows):
                    break
                # the step loop runs one token ahead: look two positions on
                engine._check_kv_memory(cache, longest + step + 3, len(prompts))
        finally:
            self.close()

    def drop(self, i: int) -> None:
        """Make no more tokens for row ``i`` (its client went away)."""
        self.rows[i].dropped = True

    def close(self) -> None:
        if self._steps is not None:
            self._steps.close()  # type: ignore[attr-defined]
            self._steps = None
            self.t_end = max(self.t_end, self.t_first)

    def metrics(self, i: int) -> GenerationMetrics:
        n = len(self.rows[i].tokens)
        t0, t_first, t_end = self.t0, self.t_first, self.t_end
        return GenerationMetrics(
            prompt_tokens=len(self.prompts[i]),
            generated_tokens=n,
            time_to_first_token=t_first - t0,
            prefill_tokens_per_s=sum(map(len, self.prompts)) / max(t_first - t0, 1e-9),
            decode_tokens_per_s=(n - 1) / (t_end - t_first) if n > 1 and t_end > t_first else 0.0,
            total_time=t_end - t0,
            peak_memory=memory.peak(),
            active_memory=memory.active(),
        )


class _Row:
    def __init__(self, detok, matcher: StopStringMatcher, stop_ids: frozenset[int] | set[int], limit: int) -> None:
        self.detok, self.matcher, self.stop_ids, self.limit = detok, matcher, stop_ids, limit
        self.text = ""
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list = []
        self.finish: str | None = None
        self.dropped = False

    @property
    def done(self) -> bool:
        return self.finish is not None or self.dropped

    def top(self, opts: GenerationOptions) -> list | None:
        return self.top_logprobs if opts.logprobs else None

    def add(self, tid: int, logprob: float, top: tuple | None, at_limit: bool) -> Token:
        """Take the row's next token; return it with the text it releases."""
        self.tokens.append(tid)
        self.logprobs.append(logprob)
        self.top_logprobs.append(top)
        before = len(self.text)
        if tid in self.stop_ids:
            self.text += self.matcher.feed(self.detok.finalize()) + self.matcher.flush()
            self.finish = "stop"
        else:
            self.text += self.matcher.feed(self.detok.add_token(tid))
            if self.matcher.stopped:
                self.finish = "stop"
            elif at_limit:
                self.text += self.matcher.feed(self.detok.finalize())
                self.finish = "stop" if self.matcher.stopped else "length"
                self.text += self.matcher.flush()
        return Token(tid, self.text[before:], logprob, top, self.finish)


def _set_metrics(target: GenerationMetrics, source: GenerationMetrics) -> None:
    for f in fields(source):
        setattr(target, f.name, getattr(source, f.name))

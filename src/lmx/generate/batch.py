"""Padded batch generation: one left-padded batch, per-row stop and finish_reason."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import mlx.core as mx

from lmx import memory
from lmx.generate.options import GenerationOptions
from lmx.generate.sampling import KeySequence, make_logits_processors, make_sampler, top_logprobs
from lmx.generate.step import generate_step
from lmx.generate.stopping import StopStringMatcher
from lmx.results import Completion, GenerationMetrics

if TYPE_CHECKING:
    from lmx.engine import Engine


def batch_generate(engine: Engine, prompts: list[list[int]], opts: GenerationOptions) -> list[Completion]:
    """Generate for every prompt in one batch; rows that finish early are masked out of the output.

    Rows are left-padded; padded key positions are masked in every layer, so a row's
    result does not depend on the others (up to float rounding). Each row stops on its
    own: at a stop id or string, at ``max_tokens``, or where its prompt plus its output
    reach the context length.
    """
    if not prompts:
        return []
    model, tokenizer = engine.model, engine.tokenizer
    longest = max(len(p) for p in prompts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pads = [longest - len(p) for p in prompts]
    tokens = mx.array([[pad_id] * n + p for n, p in zip(pads, prompts)])  # (B, L)
    processors = make_logits_processors(opts, prompt_len=longest)
    # The processors see each row's first token where the padding is: the repetition
    # penalty counts a token once, so that changes nothing, where pad ids would be penalised.
    history = mx.array([[p[0]] * n + p for n, p in zip(pads, prompts)]) if processors else None
    stop_ids = engine._eos | {s for s in opts.stop if isinstance(s, int)}
    limits = [min(opts.max_tokens, engine.context_length - len(p)) for p in prompts]
    rows = [
        _Row(tokenizer.detokenizer(), StopStringMatcher(s for s in opts.stop if isinstance(s, str))) for _ in prompts
    ]
    memory.reset_peak()
    t0 = time.perf_counter()
    steps = generate_step(
        model,
        tokens,
        model.make_cache(),
        make_sampler(opts.temperature, opts.top_k, opts.top_p, opts.min_p),
        KeySequence(opts.seed).next,
        history=history,
        processors=processors,
        pad=mx.array(pads) if any(pads) else None,
        prefill_step_size=engine.prefill_step_size,
    )
    t_first = t0
    try:
        for step, (token, logprobs) in enumerate(steps):
            ids = token.tolist()
            chosen = mx.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0].tolist()
            tops: list = [None] * len(rows)
            if opts.logprobs:
                top_ids, top_vals = top_logprobs(logprobs, opts.logprobs)
                tops = [tuple(zip(i, v)) for i, v in zip(top_ids.tolist(), top_vals.tolist())]
            if step == 0:
                t_first = time.perf_counter()
            for row, tid, lp, top, limit in zip(rows, ids, chosen, tops, limits):
                if row.finish is None:
                    row.add(tid, lp, top, tid in stop_ids, step + 1 >= limit)
            if all(r.finish is not None for r in rows):
                break
    finally:
        steps.close()
    t_end = time.perf_counter()
    out = []
    for prompt, row in zip(prompts, rows):
        n = len(row.tokens)
        metrics = GenerationMetrics(
            prompt_tokens=len(prompt),
            generated_tokens=n,
            time_to_first_token=t_first - t0,
            prefill_tokens_per_s=sum(map(len, prompts)) / max(t_first - t0, 1e-9),
            decode_tokens_per_s=(n - 1) / (t_end - t_first) if n > 1 and t_end > t_first else 0.0,
            total_time=t_end - t0,
            peak_memory=memory.peak(),
            active_memory=memory.active(),
        )
        top = row.top_logprobs if opts.logprobs else None
        out.append(Completion(row.text, row.tokens, row.finish or "length", metrics, row.logprobs, top))
    return out


class _Row:
    def __init__(self, detok, matcher: StopStringMatcher) -> None:
        self.detok, self.matcher = detok, matcher
        self.text = ""
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list = []
        self.finish: str | None = None

    def add(self, tid: int, logprob: float, top: tuple | None, is_stop_id: bool, at_limit: bool) -> None:
        self.tokens.append(tid)
        self.logprobs.append(logprob)
        self.top_logprobs.append(top)
        if is_stop_id:
            self.text += self.matcher.feed(self.detok.finalize()) + self.matcher.flush()
            self.finish = "stop"
            return
        self.text += self.matcher.feed(self.detok.add_token(tid))
        if self.matcher.stopped:
            self.finish = "stop"
        elif at_limit:
            self.text += self.matcher.feed(self.detok.finalize())
            self.finish = "stop" if self.matcher.stopped else "length"
            self.text += self.matcher.flush()

"""Speculative turns of the scheduler: a lone greedy row drafts several tokens, then checks them in one
pass (prompt lookup or a draft model; docs/architecture.md says when). A mixin of
:class:`lmx.scheduler.Scheduler`, whose state it uses."""

from __future__ import annotations

import time

import mlx.core as mx

from lmx.generate.sampling import chosen_logprobs
from lmx.generate.speculative import ModelDrafter, PromptLookup, verify
from lmx.models.cache import trim_caches
from lmx.scheduler.state import Batch, Clock, Row


class SpeculativeTurns:
    """The scheduler's speculative decoding (see :meth:`_speculative_turn`)."""

    def _speculates(self, row: Row) -> bool:
        """Whether a lone row drafts and verifies this turn: greedy, unconstrained, asked to, and
        not in a tensor-parallel group (there every row decodes plainly)."""
        mode = row.request.options.speculative
        if mode is None or not row.sampler.greedy or row.sampler.matcher is not None or self._sync is not None:
            return False
        return mode == "prompt-lookup" or self.draft_model is not None

    def _speculative_turn(self, batch: Batch) -> None:
        """A turn for a lone speculating row: hand over its pending token, draft, verify the drafts
        in one pass and hand over the accepted ones (the model's next choice becomes pending), then
        prefill, leave and join as in a plain turn. A joining row ends the speculation: with two
        rows the loop runs plain batched steps again."""
        clock = Clock(self._stats.seconds)
        try:
            self._emit(batch)
            row = batch.rows[0]
            if row.done is None:
                self._speculate(batch, row)
        except Exception as e:  # the error goes to the request, not the worker
            self._fail_batch(e)
        clock.lap("decode")
        self._prefill_turn()
        clock.lap("prefill")
        if self._batch is batch and batch.rows:
            self._leave(batch)
        clock.lap("leave")
        self._join()
        clock.lap("join")

    def _speculate(self, batch: Batch, row: Row) -> None:
        request, opts = row.request, row.request.options
        if row.drafter is None:
            row.drafter = (
                PromptLookup(opts.prompt_lookup_ngram)
                if opts.speculative == "prompt-lookup"
                else ModelDrafter(self.draft_model, self.config.prefill_step_size, self.model.args.vocab_size)
            )
        seq = request.ids + request.generated  # the pending token last: not yet in the caches
        room = request.limit - len(request.generated) - 1  # drafts past max_tokens would be cut anyway
        drafts = row.drafter.propose(seq, min(opts.num_draft_tokens, room), row.sampler) if room > 0 else []
        with self._routed(batch.rows):
            done = verify(self.model, batch.caches, seq[-1], drafts, row.sampler, self.decoder.ops)
        s = self._stats
        s.steps += 1
        s.speculative_steps += 1
        s.draft_tokens += done.drafted
        s.accepted_tokens += done.accepted
        request.metrics.draft_tokens += done.drafted
        request.metrics.accepted_tokens += done.accepted
        lp = done.logprobs
        chosen = chosen_logprobs(lp, mx.array(done.tokens)).tolist()
        now = time.perf_counter()
        for j in range(done.accepted):
            self._hand(row, done.tokens[j], chosen[j], lp[j : j + 1], now)
            if row.done is not None:  # a stop inside the accepted run: the caches keep what was handed over
                trim_caches(batch.caches, done.accepted - j - 1)
                return
        batch.tokens, batch.logprobs = mx.array(done.tokens[-1:], dtype=mx.uint32), lp[-1:]


__all__ = ["SpeculativeTurns"]

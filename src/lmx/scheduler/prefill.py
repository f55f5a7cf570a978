"""Prefill turns of the scheduler: which waiting requests start (admission by KV memory, prefix
cache hits, groups of short prompts), one prefill chunk a turn, and prefilled requests joining the
decode batch. A mixin of :class:`lmx.scheduler.Scheduler`, whose state it uses."""

from __future__ import annotations

import logging

import mlx.core as mx

from lmx.generate.row import RowOutput, RowSampler, sample_rows
from lmx.models import batch_cache
from lmx.models.cache import KVCache
from lmx.runtime import memory
from lmx.scheduler.request import Request
from lmx.scheduler.state import Prefill, Row

logger = logging.getLogger(__name__)


class PrefillTurns:
    """The scheduler's prefill and admission (see :meth:`_prefill_turn` and :meth:`_admit`)."""

    def _prefill_turn(self) -> None:
        """Run one prefill chunk: of the request in progress, or of the next admitted ones."""
        if self._prefill is None:
            self._prefill = self._start_prefill()
            if self._prefill is None:
                return
        self._quiesce_or_fail()  # a queued decode step first: this thread evaluates here
        job = self._prefill
        try:
            if any(r.request.cancelled for r in job.rows) and len(job.rows) == 1:
                self._finish(job.rows[0].request, "cancelled")
                self._prefill = None
                return
            step = self.config.prefill_step_size
            images = job.rows[0].request.images
            if images is not None:  # alone; a chunk never splits an image block
                start = job.caches[0].offset
                step = images.chunk_end(start, start + step) - start
            chunk, rest = job.tokens[:, :step], job.tokens[:, step:]
            with self._routed(job.rows):
                if images is not None:
                    logits = self.decoder.prefill_images(chunk, job.caches, images)
                else:
                    logits = self.decoder.prefill(chunk, job.caches, job.pad, step)
            if rest.shape[1]:
                job.tokens = rest
                self._eval([c.state for c in job.caches])
                return
            tokens, logprobs = sample_rows(logits, [r.sampler for r in job.rows], self.decoder.ops)
            self._eval(tokens, logprobs)
            job.first = (tokens, logprobs)
            self._store_prompts(job)
        except Exception as e:  # the error goes to the requests being prefilled
            logger.debug("prefill failed: %r", e)
            self._group_error(e)
            for row in job.rows:
                self._finish(row.request, None, e)
            self._prefill = None
            return
        for row in job.rows:
            row.request.prefill_started = job.started
        self._joiners.append(job)
        self._prefill = None

    def _store_prompts(self, job: Prefill) -> None:
        if not self.prefix_cache.max_bytes:
            return
        if len(job.rows) == 1:
            request = job.rows[0].request
            ids = request.cache_ids
            self.prefix_cache.store(ids, batch_cache.copy_prefix(job.caches, len(ids)), request.options.adapter)
            return
        for i, row in enumerate(job.rows):
            request = row.request
            self.prefix_cache.store(
                request.cache_ids, batch_cache.extract(job.caches, i, row.start), request.options.adapter
            )

    def _start_prefill(self) -> Prefill | None:
        """Take the next waiting requests that may start now (see :meth:`_admit`)."""
        budget = self.config.prefill_step_size
        taken: list[tuple[Request, list[KVCache] | None, int]] = []
        with self._lock:
            while self._waiting:
                request = self._waiting[0]
                if request.cancelled:
                    self._waiting.popleft()
                    self._finish(request, "cancelled")
                    continue
                live = len(self._batch.rows) + sum(len(j.rows) for j in self._joiners) + len(taken)
                if live >= self.config.max_batch:
                    break
                adapter = request.options.adapter  # keys and values depend on the adapter
                cached, n_cached = self.prefix_cache.lookup(request.cache_ids, adapter) if not taken else (None, 0)
                if cached is not None and len(self._waiting) > 1 and not self._worth_it(n_cached, len(request.ids)):
                    cached, n_cached = None, 0  # a few shared tokens: prefilled with the others instead
                # a prompt with images is prefilled alone (unpadded, chunked around its image blocks)
                fresh_short = cached is None and len(request.ids) <= budget and request.images is None
                if taken and not fresh_short:
                    break  # a group holds only short prompts without a cached prefix
                width = max([len(r.ids) for r, _, _ in taken] + [len(request.ids)])
                if taken and width * (len(taken) + 1) > budget:
                    break
                if not self._admit(request, extra_rows=len(taken)):
                    if live == 0:  # nothing runs that could give memory back: it will never fit
                        self._waiting.popleft()
                        self._finish(request, None, self.kv_budget.refusal(len(request.ids) + request.limit))
                        continue
                    break
                self._waiting.popleft()
                taken.append((request, cached, n_cached))
                if not fresh_short:
                    break  # a long prompt or a cache hit is prefilled alone
        if not taken:
            return None
        rows = []
        for request, _, n_cached in taken:
            request.metrics.cached_tokens = n_cached
            opts = request.options
            output = RowOutput(self.tokenizer.detokenizer(), opts.stop, self.eos, request.limit)
            matcher = self.constraints.matcher(opts.constraint) if opts.constraint is not None else None
            rows.append(Row(request, RowSampler(opts, request.ids, matcher, self.model.ops), output, 0))
        if len(taken) == 1:
            request, cached, n_cached = taken[0]
            caches = cached if cached is not None else self.model.make_cache(self.kv_quant)
            return Prefill(rows, caches, mx.array([request.ids[n_cached:]]), None)
        width = max(len(r.ids) for r, _, _ in taken)
        pads = [width - len(r.ids) for r, _, _ in taken]
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        tokens = mx.array([[pad_id] * p + r.ids for p, (r, _, _) in zip(pads, taken)])  # (G, width)
        for row, p in zip(rows, pads):
            row.start = p
        return Prefill(rows, self.model.make_cache(self.kv_quant), tokens, mx.array(pads, dtype=mx.int32))

    @staticmethod
    def _worth_it(n_cached: int, n_prompt: int) -> bool:
        """Whether a prefix-cache hit saves enough to prefill its request alone: a hit of a few
        tokens ("Request ", a template's header) is worth less than prefilling it in a group."""
        return n_cached >= 32 or 2 * n_cached >= n_prompt

    def _join(self) -> None:
        """Prefilled requests join the decode batch (their first token is emitted next turn)."""
        if not self._joiners:
            return
        self._quiesce_or_fail()
        batch = self._batch
        for job in self._joiners:
            assert job.first is not None
            tokens, logprobs = job.first
            if not batch.rows:
                self.decoder.refresh()  # a new batch: check the decode step against the weights
                batch.rows, batch.caches = job.rows, job.caches
                batch.tokens, batch.logprobs = tokens, logprobs
            else:
                a_starts, b_starts = batch_cache.merge(
                    batch.caches, [r.start for r in batch.rows], job.caches, [r.start for r in job.rows]
                )
                for r, s in zip(batch.rows, a_starts):
                    r.start = s
                for r, s in zip(job.rows, b_starts):
                    r.start = s
                batch.rows = batch.rows + job.rows
                assert batch.tokens is not None and batch.logprobs is not None
                batch.tokens = mx.concatenate([batch.tokens, tokens])
                batch.logprobs = mx.concatenate([batch.logprobs, logprobs])
            self._compact(batch)
        self._joiners = []

    # ------------------------------------------------------------------ memory
    def _check_fits_alone(self, request: Request) -> None:
        """Refuse at once a request whose KV cache could not fit even with nothing else running."""
        held = batch_cache.nbytes(self._batch.caches) + self.prefix_cache.nbytes
        positions = len(request.ids) + request.limit
        if self.kv_budget.bytes(positions) > self.kv_budget.free(held):
            raise self.kv_budget.refusal(positions, held)

    def _admit(self, request: Request, extra_rows: int) -> bool:
        """Whether ``request`` may start now: the batch's KV cache with it, to the end of every
        row, fits the memory limit (the prefix cache gives memory back first)."""
        batch = self._batch
        rows = [*batch.rows, *(r for j in self._joiners for r in j.rows)]
        offset = batch.caches[0].offset if batch.caches else 0
        remaining = [r.request.limit - len(r.request.generated) for r in rows]
        width = max([offset, len(request.ids)] + [j.caches[0].offset for j in self._joiners if j.caches])
        need = self.kv_budget.bytes(width + max([request.limit, *remaining]), len(rows) + extra_rows + 1)
        if rows or extra_rows:  # joining a batch: its own prefill cache lives beside the batch's until merged
            need += self.kv_budget.bytes(len(request.ids))
        held = batch_cache.nbytes(batch.caches)
        free = self._free(held)
        if need > free and self.prefix_cache.nbytes:  # the prefix cache gives memory back first
            self.prefix_cache.evict(max(0, self.prefix_cache.nbytes - (need - free)))
            memory.clear_cache()
            free = self._free(held)
        if self._sync is None:
            return need <= free
        try:  # the leader's decision: a rank's own sizes may differ (pipeline parallel: other layers)
            return bool(self._sync.broadcast_int(int(need <= free)))
        except RuntimeError as e:
            raise self._sync.lost(e) from e


__all__ = ["PrefillTurns"]

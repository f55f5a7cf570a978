"""The scheduler: every request runs here, as a row of one continuously batched decode loop.

One worker thread owns the model. Each turn of its loop:

1. runs any exclusive job (classify, embeddings: whole-model work between two steps);
2. queues the next decode step of every live row as one batch (the device starts on it);
3. prefills waiting requests, at most ``prefill_step_size`` tokens a turn, so running streams
   never stall behind a long prompt; a prefilled request joins the batch at the next step;
4. hands the previous step's tokens to their requests, and lets finished or cancelled rows
   leave at once (their KV memory goes back).

A lone greedy row that asks for speculative decoding drafts several tokens a turn and checks
them in one pass instead (:meth:`Scheduler._speculative_turn`; docs/architecture.md says when).

Each row has its own options (sampler, penalties, seed and random keys, stop strings,
``max_tokens``, ``logprobs``), so a request gets, token for token, what it gets alone; rows
differ from running alone only by float rounding. Requests sharing a prefix with an earlier
one take its keys/values from the :class:`PrefixCache`. A request is admitted when the KV
memory the batch would need with it, to the end of every row, fits the memory limit; until
then it waits, and one that could never fit is refused at once with
:class:`lmx.errors.OutOfMemoryError`.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import mlx.core as mx

from lmx.errors import EngineClosedError, GroupLostError, QueueFullError
from lmx.generate.constraints import ConstraintCompiler
from lmx.generate.encoder import Queued
from lmx.generate.options import GenerationOptions
from lmx.generate.row import sample_rows
from lmx.generate.sampling import chosen_logprobs, top_logprobs
from lmx.generate.step import Decoder
from lmx.models import batch_cache
from lmx.models.cache import KVCache, kv_quant
from lmx.models.image_prompt import ImagePrompt
from lmx.runtime import memory
from lmx.scheduler.admission import KVBudget
from lmx.scheduler.prefill import PrefillTurns
from lmx.scheduler.prefix_cache import PrefixCache
from lmx.scheduler.request import AdapterRouter, Request, Sink
from lmx.scheduler.speculate import SpeculativeTurns
from lmx.scheduler.state import Batch, Clock, Exclusive, Prefill, Row, SchedulerConfig, SchedulerStats
from lmx.scheduler.sync import NullSink, TurnSync, decode_turn, encode_turn, options_to_dict

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Scheduler(PrefillTurns, SpeculativeTurns):
    """Runs requests on one model with continuous batching and a prefix cache.

    Args:
        model: the model (``hidden``, ``head``, ``make_cache``, ``args``).
        tokenizer: its tokenizer (for each row's detokenizer).
        eos: the model's end-of-sequence ids.
        config: see :class:`SchedulerConfig`.
        decoder: runs one-token decode steps (see :class:`lmx.generate.step.Decoder`).
        adapters: routes each row to its request's ``adapter`` before every forward pass
            (None: no adapters); rows' cached prefixes are kept apart by adapter.
        draft_model: the model that drafts for rows with ``speculative="draft-model"`` (same
            vocabulary; None: no such rows, see :meth:`lmx.Engine.options`).
        sync: the tensor-parallel group this scheduler runs in step with (:mod:`lmx.scheduler.sync`);
            None: it runs alone. A follower (rank > 0) takes no requests: :meth:`follow` replays
            the leader's.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        eos: frozenset[int],
        config: SchedulerConfig,
        decoder: Decoder,
        adapters: AdapterRouter | None = None,
        draft_model: Any = None,
        sync: TurnSync | None = None,
    ) -> None:
        self.model, self.tokenizer, self.eos, self.config, self.decoder = model, tokenizer, eos, config, decoder
        self.adapters = adapters
        self.draft_model = draft_model
        self.prefix_cache = PrefixCache(config.prefix_cache_bytes)
        args = model.args
        self.constraints = ConstraintCompiler(tokenizer, eos, args.vocab_size)  # compiled once per spec
        self.kv_quant = kv_quant(config.kv_bits, config.kv_group_size, args.head_dim)
        windows = [c.window for c in model.make_cache()]
        self.kv_budget = KVBudget(
            windows, args.num_key_value_heads, args.head_dim, config.kv_itemsize, config.kv_bits, config.kv_group_size
        )
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: collections.deque[Request] = collections.deque()
        self._exclusive: collections.deque[Exclusive] = collections.deque()
        self._prefill: Prefill | None = None
        self._joiners: list[Prefill] = []
        self._batch = Batch()
        self._stats = SchedulerStats()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._stopped = threading.Event()
        self._end_thread = False  # the worker returns when it stops, instead of parking (at exit)
        self._sync = sync
        self._inbox: list[Request] = []  # submitted, not yet shared with the group (sync only)
        self._by_id: dict[int, Request] = {}  # requests the group knows, by sync_id
        self._next_id = 0
        self._ending = False  # closing, as the group agreed (sync only)
        self._broken: GroupLostError | None = None  # the group lost a rank: nothing runs any more
        self._turn_started: float | None = None  # when the running turn began (sync: the watchdog reads it)
        # The plan's encode_thread, alone (a group evaluates each step at once): this thread builds
        # on the encoder's stream and each decode step is queued by the encoder's thread while the
        # next turn goes on. This thread evaluates nothing while a step is being queued (_quiesce first).
        self._encoder = decoder.state.encoder() if decoder.state.plan.encode_thread and sync is None else None
        self._job: Queued | None = None

    # ------------------------------------------------------------------ callers' side
    def submit(self, request: Request) -> Request:
        """Queue ``request``; its tokens go to its sink as they are made.

        Raises:
            QueueFullError: ``max_queue`` requests already wait.
            OutOfMemoryError: the request's KV cache could never fit, even alone.
            EngineClosedError: the scheduler is closed.
            InvalidOptionError: its ``constraint`` does not compile (an unsupported feature).
        """
        if self._sync is not None:
            self._check_shareable(request)
        self._check_fits_alone(request)
        if request.options.constraint is not None:
            self.constraints.compile(request.options.constraint)
        with self._lock:
            if self._broken is not None:
                raise self._broken
            if self._closed:
                raise EngineClosedError("the engine is closed; load the model again with lmx.load()")
            if len(self._waiting) + len(self._inbox) >= self.config.max_queue:
                self._stats.rejected += 1
                raise QueueFullError(
                    f"server busy: {len(self._waiting)} requests already wait (max_queue={self.config.max_queue}); "
                    "retry later"
                )
            if self._sync is None:
                self._waiting.append(request)
            else:  # it joins the waiting line when the group learns of it, at the next turn
                request.defer_cancel = True
                self._inbox.append(request)
            self._start_worker()
            self._wake.notify()
        return request

    def _check_shareable(self, request: Request) -> None:
        """In a tensor-parallel group: refuse what the followers cannot replay.

        Raises:
            EngineClosedError: this is a follower (it takes no requests).
            InvalidOptionError: a ``constraint`` or ``adapter`` (not supported with tensor parallel).
        """
        from lmx.errors import InvalidOptionError

        assert self._sync is not None
        if not self._sync.leader:
            raise EngineClosedError("this rank of a tensor-parallel group follows rank 0; submit requests there")
        for name in ("constraint", "adapter"):
            if getattr(request.options, name) is not None:
                raise InvalidOptionError(
                    f"{name} is not supported with tensor parallel or pipeline parallel; run without it"
                )

    def follow(self) -> None:
        """Replay the leader's turns until it closes (a follower's main loop; returns when the group ends).

        Raises:
            GroupLostError: another rank ended or became unreachable.
        """
        assert self._sync is not None and not self._sync.leader
        with self._lock:
            self._start_worker()
        self._stopped.wait()
        if self._broken is not None:
            raise self._broken

    def cancel(self, request: Request) -> None:
        """Stop ``request``: it ends (finish reason ``cancelled``) at the next step."""
        request.cancel()
        with self._lock:
            self._wake.notify()

    def run_exclusive(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` on the worker between two decode steps, with the model to itself;
        return its result or raise its error. Other requests pause meanwhile."""
        if threading.current_thread() is self._thread:
            return fn()
        if self._sync is not None:
            from lmx.errors import InvalidOptionError

            raise InvalidOptionError(
                "classify and embeddings are not supported with tensor parallel or pipeline parallel"
            )
        job = Exclusive(fn)
        with self._lock:
            if self._closed:
                raise EngineClosedError("the engine is closed; load the model again with lmx.load()")
            self._exclusive.append(job)
            self._start_worker()
            self._wake.notify()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def stats(self) -> SchedulerStats:
        """A snapshot of the counts and the load."""
        with self._lock:
            s = self._stats
            prefill = len(self._prefill.rows) if self._prefill else 0
            return SchedulerStats(
                running=len(self._batch.rows) + prefill + sum(len(j.rows) for j in self._joiners),
                waiting=len(self._waiting) + len(self._inbox),
                completed=s.completed,
                cancelled=s.cancelled,
                failed=s.failed,
                rejected=s.rejected,
                steps=s.steps,
                batched_steps=s.batched_steps,
                speculative_steps=s.speculative_steps,
                draft_tokens=s.draft_tokens,
                accepted_tokens=s.accepted_tokens,
                max_batch_seen=s.max_batch_seen,
                kv_bytes=batch_cache.nbytes(self._batch.caches),
                prefix=self.prefix_cache.stats(),
                seconds=dict(s.seconds),
            )

    def adapters_in_use(self) -> collections.Counter[str]:
        """How many requests (running, being prefilled or waiting) use each adapter."""
        with self._lock:
            requests = [r.request for r in self._batch.rows]
            requests += [
                r.request for j in [*self._joiners, *([self._prefill] if self._prefill else [])] for r in j.rows
            ]
            requests += list(self._waiting) + self._inbox
        return collections.Counter(r.options.adapter for r in requests if r.options.adapter is not None)

    def close(self, timeout: float | None = 30.0) -> None:
        """End every request (they finish ``cancelled``) and stop the worker, waiting up to
        ``timeout`` seconds for it (None: not at all). Idempotent."""
        with self._lock:
            self._closed = True
            thread = self._thread
            self._wake.notify()
        if thread is None:
            self._stopped.set()
            self._release()
        elif thread is not threading.current_thread() and timeout is not None:
            self._stopped.wait(timeout)

    def _close_at_exit(self, timeout: float) -> None:
        """Stop a running worker and let its thread end while the interpreter still runs (see the
        end of :meth:`_work`); a closed one is parked already."""
        with self._lock:
            if self._closed or self._thread is None:
                return
            self._end_thread = True
            thread = self._thread
        self.close(timeout)
        thread.join(timeout)
        # join() returns when the thread's Python state is gone; its C++ thread-locals (MLX's compile
        # cache, whose destructor takes the GIL) are destroyed after that. Wait, without the GIL, until
        # the thread itself is gone (Linux lists it in /proc; elsewhere, a moment).
        task = Path(f"/proc/self/task/{thread.native_id}")
        if not task.parent.is_dir():
            time.sleep(0.05)
            return
        deadline = time.monotonic() + timeout
        while task.exists() and time.monotonic() < deadline:
            time.sleep(0.001)

    # ------------------------------------------------------------------ the worker
    def _start_worker(self) -> None:
        if self._thread is None:
            _RUNNING.add(self)
            self._thread = threading.Thread(target=self._work, name="lmx-scheduler", daemon=True)
            self._thread.start()
            if self._sync is not None:
                threading.Thread(target=self._watch, name="lmx-scheduler-watchdog", daemon=True).start()

    def _watch(self) -> None:
        """In a group: end everything when a turn outlasts ``step_timeout`` (a rank died while this
        one waited on it inside a collective, which MLX may never return from)."""
        assert self._sync is not None
        timeout = self.config.step_timeout
        while not self._stopped.wait(min(1.0, timeout / 4)):
            started = self._turn_started
            if started is None or time.monotonic() - started <= timeout:
                continue
            self._broken = self._sync.lost(TimeoutError(f"a step has not finished after {timeout:g} s"))
            logger.error("%s", self._broken)
            with self._lock:
                requests = [r.request for r in self._batch.rows]
                requests += [
                    r.request for j in [*self._joiners, *([self._prefill] if self._prefill else [])] for r in j.rows
                ]
                requests += list(self._waiting) + self._inbox
                self._waiting.clear()
                self._inbox = []
            for request in requests:
                self._finish(request, None, self._broken)
            self._stopped.set()  # the worker stays where it is stuck; nothing waits for it
            return

    def _has_work(self) -> bool:
        return bool(
            self._waiting or self._inbox or self._exclusive or self._prefill or self._joiners or self._batch.rows
        )

    def _work(self) -> None:
        stream = mx.stream(self._encoder.stream) if self._encoder is not None else contextlib.nullcontext()
        with stream:
            self._work_turns()
        # Park instead of returning: MLX keeps a compile cache per thread whose destructor takes
        # the GIL when the thread ends; during interpreter shutdown that aborts the process
        # (mlx 0.32). A parked daemon thread never runs it. At exit (_close_at_exit), before that
        # shutdown, the thread ends instead: a daemon thread still running when the shutdown starts
        # ends the moment it wants the GIL, which runs that destructor.
        if not self._end_thread:
            threading.Event().wait()

    def _work_turns(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._sync is None or self._sync.leader:  # a follower waits in the exchange instead
                        while not self._has_work() and not self._closed:
                            self._wake.wait()
                    if self._sync is None and self._closed:
                        break
                    exclusive = list(self._exclusive)
                    self._exclusive.clear()
                if self._sync is not None:
                    try:
                        self._exchange()
                    except GroupLostError as e:
                        self._broken = e
                        break
                    if self._ending:
                        break
                if exclusive:
                    self._quiet()
                for job in exclusive:
                    self._run_exclusive_job(job)
                self._turn_started = time.monotonic()
                try:
                    self._turn()
                except Exception as e:  # in a group: whatever failed a turn leaves the ranks apart
                    if self._sync is None:
                        raise
                    self._broken = e if isinstance(e, GroupLostError) else self._sync.lost(e)
                    break
                finally:
                    self._turn_started = None
        finally:
            if self._broken is not None:
                logger.error("%s", self._broken)
            self._quiet()
            self._shutdown(self._broken)
            self._stopped.set()

    def _exchange(self) -> None:
        """The turn's events, as the leader saw them, on every rank: new requests join the waiting
        line, cancels take effect, a close ends the loop (see :mod:`lmx.scheduler.sync`)."""
        assert self._sync is not None
        data = b""
        if self._sync.leader:
            with self._lock:
                new, self._inbox = self._inbox, []
                closing = self._closed
            for request in new:
                request.sync_id, self._next_id = self._next_id, self._next_id + 1
                self._by_id[request.sync_id] = request
            asked = sorted(i for i, r in self._by_id.items() if r.cancel_asked and not r.cancelled)
            shared = [
                {"id": r.sync_id, "ids": r.ids, "limit": r.limit, "options": options_to_dict(r.options)} for r in new
            ]
            data = encode_turn(shared, asked, closing)
        turn = decode_turn(self._sync.share_bytes(data))
        if not self._sync.leader:
            new = []
            for item in turn["new"]:
                request = Request(item["ids"], GenerationOptions(**item["options"]), NullSink(), item["limit"])
                request.sync_id, request.defer_cancel = item["id"], True
                self._by_id[request.sync_id] = request
                new.append(request)
        with self._lock:
            self._waiting.extend(new)
        for i in turn["cancelled"]:
            if i in self._by_id:
                self._by_id[i].confirm_cancel()
        self._ending = bool(turn["close"])

    def _quiesce(self) -> None:
        """Wait until the encoder has queued the step handed to it (this thread may then evaluate);
        raise what queueing it raised."""
        job, self._job = self._job, None
        if job is not None:
            job.wait()

    def _quiet(self) -> None:
        """:meth:`_quiesce` where an error is already on its way (the step's requests get it
        from the emit or the failed batch)."""
        try:
            self._quiesce()
        except Exception as e:
            logger.debug("a queued step failed: %r", e)

    def _eval(self, *arrays: Any) -> None:
        """Start computing ``arrays``: in the background alone; in a tensor-parallel group, now
        (a collective that loses its peer raises only in a waited-for evaluation; in the background
        it leaves the step waiting forever, mlx 0.32)."""
        if self._sync is None:
            mx.async_eval(*arrays)
        else:
            mx.eval(*arrays)

    def _free(self, held: int) -> int:
        """Bytes free for KV storage (see :meth:`KVBudget.free`); in a group, the leader's count, so
        that every rank admits and evicts alike."""
        free = self.kv_budget.free(held)
        if self._sync is None:
            return free
        try:
            return self._sync.broadcast_int(free)
        except RuntimeError as e:
            raise self._sync.lost(e) from e

    def _run_exclusive_job(self, job: Exclusive) -> None:
        try:
            job.result = job.fn()
        except BaseException as e:  # handed to the caller, who raises it
            job.error = e
        finally:
            job.done.set()

    def _turn(self) -> None:
        """One turn of the loop: queue a decode step, prefill a chunk, emit, let rows join."""
        batch = self._batch
        if len(batch.rows) == 1 and self._speculates(batch.rows[0]):
            self._quiesce_or_fail()
            self._speculative_turn(batch)
            return
        queued: tuple[mx.array, mx.array, tuple[mx.array, mx.array, mx.array] | None] | None = None
        clock = Clock(self._stats.seconds)
        if batch.rows:
            try:
                queued = self._queue_decode(batch)
            except Exception as e:  # the error goes to every running request, not the worker
                self._fail_batch(e)
        clock.lap("decode")
        self._prefill_turn()
        clock.lap("prefill")
        if batch.rows and queued is not None:
            try:
                self._emit(batch)
            except Exception as e:
                self._fail_batch(e)
                queued = None
            else:
                clock.lap("emit")
                batch.tokens, batch.logprobs, batch.handed = queued
                self._leave(batch)
                clock.lap("leave")
        self._join()
        clock.lap("join")

    # ------------------------------------------------------------------ decode
    def _quiesce_or_fail(self) -> None:
        """:meth:`_quiesce`; a failed step fails the batch."""
        try:
            self._quiesce()
        except Exception as e:
            self._fail_batch(e)

    def _queue_decode(self, batch: Batch) -> tuple[mx.array, mx.array, tuple[mx.array, mx.array, mx.array] | None]:
        """Build the next decode step and start it: with an encoder, it queues the step while
        this thread goes on (after the step before is queued); the copies the emit reads go
        with it (see :attr:`Batch.handed`)."""
        assert batch.tokens is not None
        if any(r.sampler.matcher is not None for r in batch.rows):
            self._quiesce()  # a constrained row's mask reads its last token on this thread
        with self._routed(batch.rows) as adapted:  # adapted rows: the eager step (traces hold no routing)
            logits = self.decoder(batch.tokens, batch.caches, batch.pad(), eager=adapted)
        tokens, logprobs = sample_rows(logits, [r.sampler for r in batch.rows], self.decoder.ops)
        handed = None
        if self._encoder is None:
            self._eval(tokens, logprobs)
        else:
            ids = mx.stop_gradient(tokens)  # read by the emit; the next step's graph holds ``tokens``
            chosen = chosen_logprobs(logprobs, tokens)
            self._quiesce()
            self._job = self._encoder.submit(tokens, logprobs, ids, chosen)
            handed = (ids, chosen, tokens)
        s = self._stats
        s.steps += 1
        s.batched_steps += len(batch.rows) > 1
        s.max_batch_seen = max(s.max_batch_seen, len(batch.rows))
        return tokens, logprobs, handed

    def _emit(self, batch: Batch) -> None:
        """Hand every row its token of the last step; mark the rows that end."""
        assert batch.tokens is not None and batch.logprobs is not None
        values = batch.handed_values()  # queued copies: read while the next step is queued
        if values is None:
            self._quiesce()
            ids = batch.tokens.tolist()
            chosen = chosen_logprobs(batch.logprobs, batch.tokens).tolist()
        else:
            ids, chosen = values
        now = time.perf_counter()
        for i, row in enumerate(batch.rows):
            self._hand(row, ids[i], chosen[i], batch.logprobs[i : i + 1], now)

    def _hand(self, row: Row, tid: int, chosen: float, logprobs: mx.array, now: float) -> None:
        """Give ``row`` its next token ``tid`` (chosen from ``logprobs`` (1, V)); mark it if it ends."""
        request = row.request
        if request.cancelled or (self._closed if self._sync is None else self._ending):
            row.done = "cancelled"
            return
        top = None
        if request.options.logprobs:
            self._quiesce()  # computed here, on this thread
            top_ids, top_vals = top_logprobs(logprobs, request.options.logprobs)
            top = tuple(zip(top_ids[0].tolist(), top_vals[0].tolist()))
        token = row.output.add(tid, chosen, top)
        if not request.generated:
            request.first_token_at = now
        request.generated.append(tid)
        request.sink.token(token)
        if token.finish_reason is not None:
            row.done = token.finish_reason

    def _leave(self, batch: Batch) -> None:
        """Rows that ended leave the batch: their prompt and output go to the prefix cache,
        their requests end, and the caches keep the other rows only."""
        ended = [i for i, r in enumerate(batch.rows) if r.done is not None]
        if not ended:
            return
        self._quiesce()  # the caches are read and cut here
        offset = batch.caches[0].offset
        for i in ended:
            row = batch.rows[i]
            n = offset - row.start
            seen = (row.request.cache_ids + row.request.generated)[:n]
            if row.done != "cancelled" and len(seen) == n and self.prefix_cache.max_bytes:
                self.prefix_cache.store(
                    seen, batch_cache.extract(batch.caches, i, row.start), row.request.options.adapter
                )
            self._finish(row.request, row.done)
        keep = [i for i, r in enumerate(batch.rows) if r.done is None]
        if not keep:
            self._batch = Batch()
            return
        batch.rows = [batch.rows[i] for i in keep]
        batch_cache.select(batch.caches, keep)
        index = mx.array(keep, dtype=mx.int32)
        assert batch.tokens is not None and batch.logprobs is not None
        batch.tokens, batch.logprobs = batch.tokens[index], batch.logprobs[index]
        self._compact(batch)

    def _compact(self, batch: Batch) -> None:
        """Drop leading positions every row has as padding (a lone row then runs unpadded). Where the
        model's ops start each padded row's attention at its first key (lmx's CPU kernels), padded keys
        cost a decode step nothing and a cut copies every layer's storage: there the cut waits until a
        lone row is left or the padding fills a block of storage."""
        lead = min(r.start for r in batch.rows)
        lazy = self.decoder.ops.indexes_padding and len(batch.rows) > 1 and lead < KVCache.step
        if lead > 0 and not lazy:
            batch_cache.trim_front(batch.caches, lead)
            for r in batch.rows:
                r.start -= lead

    def _group_error(self, error: BaseException) -> None:
        """In a tensor-parallel group, a step that fails fails the group: the ranks may no longer
        agree (a collective lost its peer); raise :class:`GroupLostError`."""
        if self._sync is not None:
            raise self._sync.lost(error) from error

    def _fail_batch(self, error: BaseException) -> None:
        logger.debug("decode step failed: %r", error)
        self._quiet()
        self._group_error(error)
        for row in self._batch.rows:
            self._finish(row.request, None, error)
        self._batch = Batch()

    # ------------------------------------------------------------------ adapters
    @contextlib.contextmanager
    def _routed(self, rows: Sequence[Row]) -> Iterator[bool]:
        """Route ``rows`` to their adapters for the forward passes inside; back to none after
        (an exclusive job, classify say, runs the base model)."""
        if self.adapters is None:
            yield False
            return
        try:
            yield self.adapters.route([r.request.options.adapter for r in rows])
        finally:
            self.adapters.route(())

    # ------------------------------------------------------------------ ends
    def _finish(self, request: Request, reason: str | None, error: BaseException | None = None) -> None:
        now = time.perf_counter()
        m = request.metrics
        m.generated_tokens = len(request.generated)
        m.total_time = now - request.submitted
        if request.first_token_at:
            m.time_to_first_token = request.first_token_at - request.submitted
            # from its first prefill chunk to its first token readable: the prompt's compute
            prefill_time = max(request.first_token_at - (request.prefill_started or request.submitted), 1e-9)
            m.prefill_tokens_per_s = (m.prompt_tokens - m.cached_tokens) / prefill_time
            if len(request.generated) > 1 and now > request.first_token_at:
                m.decode_tokens_per_s = (len(request.generated) - 1) / (now - request.first_token_at)
        m.peak_memory, m.active_memory = memory.peak(), memory.active()
        request.finish_reason = reason if error is None else None
        counter = "failed" if error is not None else ("cancelled" if reason == "cancelled" else "completed")
        setattr(self._stats, counter, getattr(self._stats, counter) + 1)
        request.sink.end(error)
        if request.sync_id is not None:
            self._by_id.pop(request.sync_id, None)

    def _shutdown(self, error: BaseException | None = None) -> None:
        """End every request still here (closed: they finish ``cancelled``; ``error``: with it) and
        drop all caches."""
        rows = [r.request for r in self._batch.rows]
        rows += [r.request for j in [*self._joiners, *([self._prefill] if self._prefill else [])] for r in j.rows]
        with self._lock:
            rows += list(self._waiting) + self._inbox
            self._waiting.clear()
            self._inbox = []
            exclusive = list(self._exclusive)
            self._exclusive.clear()
        for request in rows:
            self._finish(request, "cancelled", error)
        for job in exclusive:
            job.error = EngineClosedError("the engine was closed before this job ran")
            job.done.set()
        self._batch, self._joiners, self._prefill = Batch(), [], None
        self._release()

    def _release(self) -> None:
        """Drop the model and every cached key/value (closed: the memory goes back now)."""
        self.prefix_cache.clear()
        self.model = self.tokenizer = self.decoder = self.draft_model = None  # type: ignore[assignment]


def make_request(
    ids: Sequence[int], options: GenerationOptions, sink: Sink, context_length: int, images: ImagePrompt | None = None
) -> Request:
    """A :class:`Request` for ``ids`` (with ``images``, if any), its token limit set by
    ``max_tokens`` and the context."""
    return Request(ids, options, sink, max(1, min(options.max_tokens, context_length - len(ids))), images)


__all__ = ["Scheduler", "make_request"]


# Schedulers whose worker was started: at exit, the ones still running are stopped while the
# interpreter still runs (an engine the program never closed: its worker would otherwise be woken by
# the engine's finaliser during the shutdown, and end the process with SIGABRT, mlx 0.32).
_RUNNING: weakref.WeakSet[Scheduler] = weakref.WeakSet()


@atexit.register
def _close_running_at_exit() -> None:
    for scheduler in list(_RUNNING):
        scheduler._close_at_exit(timeout=10.0)

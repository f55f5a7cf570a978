"""The LoRA training loop: AdamW with warm-up + decay, clipping, accumulation, checkpoints,
validation, progress, and data-parallel gradient sums over ``mlx.distributed``.

Losses are summed over target tokens and divided once per optimizer step by the total
number of target tokens, over all micro-batches and all processes. So a step under
``mlx.launch`` with N processes, or with gradient accumulation, equals one step over the
combined batch. Everything random (LoRA init, data order, dropout) is a function of
``seed`` and the step, which is what makes ``resume`` exact.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from lmx.errors import InvalidOptionError
from lmx.runtime import memory
from lmx.train.checkpoint import check_compatible, load_checkpoint, restore, save_checkpoint
from lmx.train.config import TrainConfig
from lmx.train.data import Dataset, DatasetError, collate, epoch_batches, load_split
from lmx.train.evaluate import EvalResult, evaluate
from lmx.train.grad_checkpoint import checkpoint_layers, uncheckpoint_layers
from lmx.train.lora import AdapterConfig, apply_lora, save_adapter, set_dropout_keys, trainable_count
from lmx.train.losses import loss_sum
from lmx.train.optim import add_trees, all_sum, clip_gradients, lr_schedule, make_optimizer, scale_tree
from lmx.train.plot import write_loss_curve

logger = logging.getLogger(__name__)

LOSS_CURVE = "loss_curve.png"
HISTORY = "history.json"

# Settings that shape the trajectory: resuming with any of them changed is refused.
_RESUME_KEYS = (
    "model", "data", "dtype", "rank", "alpha", "dropout", "num_layers", "targets", "lr", "min_lr", "warmup",
    "schedule", "weight_decay", "grad_clip", "batch_size", "iters", "epochs", "grad_accum", "max_seq_len",
    "mask_prompt", "seed",
)  # fmt: skip


@dataclass(frozen=True)
class StepReport:
    """What one optimizer step did (losses are means over its target tokens, all processes)."""

    step: int
    total_steps: int
    loss: float
    learning_rate: float
    grad_norm: float
    tokens: int  # real (unpadded) tokens read this step, all processes
    target_tokens: int  # tokens scored in the loss this step, all processes
    tokens_per_s: float  # real tokens per second
    peak_memory: int  # bytes, this process
    val: EvalResult | None = None


@dataclass
class TrainResult:
    """The outcome of :meth:`Trainer.run`."""

    adapter_path: Path
    steps: int
    history: list[tuple[int, float]] = field(default_factory=list)
    val_history: list[tuple[int, float]] = field(default_factory=list)
    final_val: EvalResult | None = None
    loss_curve: Path | None = None
    trainable_parameters: int = 0
    elapsed_s: float = 0.0


class Trainer:
    """Fine-tune a model with LoRA as ``config`` says.

    Args:
        config: the settings (see :class:`TrainConfig`).
        model, tokenizer: an already loaded model and tokenizer (default: load ``config.model``).
        group: the ``mlx.distributed`` group (default: ``mx.distributed.init()``, which is a
            single process unless started by ``mlx.launch``).

    Raises:
        DatasetError: missing/malformed data, or fewer examples than a batch.
        InvalidOptionError: a setting that does not fit the model, data or process count.
        lmx.errors.LmxError: the model or checkpoint cannot be loaded.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        model: nn.Module | None = None,
        tokenizer: Any = None,
        group: mx.distributed.Group | None = None,
    ) -> None:
        self.config = config
        self.group = group if group is not None else mx.distributed.init()
        self.rank, self.world = self.group.rank(), self.group.size()
        if config.batch_size % self.world:
            raise InvalidOptionError(
                f"batch_size must be a multiple of the {self.world} processes, got {config.batch_size}"
            )
        self.base_model = config.model
        if model is None:
            from lmx.loading import load_model
            from lmx.runtime.device import choose_device

            choose_device(config.device)
            loaded = load_model(config.model, dtype=config.dtype)
            model, tokenizer = loaded.model, loaded.tokenizer
            self.base_model = loaded.source
        if tokenizer is None:
            raise InvalidOptionError("a tokenizer must be given with the model")
        self.model, self.tokenizer = model, tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        if not config.data:
            raise InvalidOptionError("data must name a directory with train.jsonl (or a .jsonl file), got ''")
        kw = {"mask_prompt": config.mask_prompt, "max_seq_len": config.max_seq_len}
        train = load_split(config.data, "train", tokenizer, **kw)
        if train is None:
            raise DatasetError(f"no train.jsonl in {config.data}")
        self.train_set: Dataset = train
        self.valid_set: Dataset | None = load_split(config.data, "valid", tokenizer, **kw)
        self.batches_per_epoch = len(train) // config.batch_size
        if self.batches_per_epoch == 0:
            raise DatasetError(f"{train.path} has {len(train)} examples, fewer than batch_size={config.batch_size}")
        if config.iters:
            self.total_steps = config.iters
        else:
            self.total_steps = max(1, (config.epochs or 1) * self.batches_per_epoch // config.grad_accum)

        applied = apply_lora(
            model,
            rank=config.rank,
            alpha=config.alpha,
            dropout=config.dropout,
            targets=config.targets,
            num_layers=config.num_layers,
            seed=config.seed,
        )
        self.adapter_config: AdapterConfig = dataclasses.replace(
            applied, base_model=self.base_model, train=config.as_dict()
        )
        mx.eval(model.parameters())
        schedule = lr_schedule(
            config.lr, self.total_steps, warmup=config.warmup, schedule=config.schedule, min_lr=config.min_lr
        )
        self.optimizer = make_optimizer(schedule, config.weight_decay)
        self.step = 0
        self.history: list[tuple[int, float]] = []
        self.val_history: list[tuple[int, float]] = []
        self.trained_tokens = 0
        self._orders: dict[int, list[list[int]]] = {}
        self._loss_and_grad = nn.value_and_grad(model, loss_sum)
        if config.resume:
            self._resume()

    # ------------------------------------------------------------------ state
    def _fingerprint(self) -> dict[str, Any]:
        values = self.config.as_dict()
        return {k: values[k] for k in _RESUME_KEYS}

    def _resume(self) -> None:
        ckpt = load_checkpoint(self.config.adapter_path)
        check_compatible(ckpt.state.get("config", {}), self._fingerprint())
        restore(ckpt, self.model, self.optimizer)
        self.step = ckpt.step
        self.history = [(int(s), float(v)) for s, v in ckpt.state.get("history", [])]
        self.val_history = [(int(s), float(v)) for s, v in ckpt.state.get("val_history", [])]
        self.trained_tokens = int(ckpt.state.get("trained_tokens", 0))
        logger.info("resumed from %s at step %d", ckpt.path, self.step)

    def _state(self) -> dict[str, Any]:
        return {
            "config": self._fingerprint(),
            "history": self.history,
            "val_history": self.val_history,
            "trained_tokens": self.trained_tokens,
        }

    # ------------------------------------------------------------------ data
    def _global_batch(self, k: int) -> list[int]:
        """Example indices of global micro-batch ``k`` (0-based, counted over the whole run)."""
        epoch, j = divmod(k, self.batches_per_epoch)
        if epoch not in self._orders:
            self._orders = {epoch: epoch_batches(self.train_set, self.config.batch_size, epoch, self.config.seed)}
        return self._orders[epoch][j]

    def _local_batch(self, k: int) -> list[int]:
        per = self.config.batch_size // self.world
        return self._global_batch(k)[self.rank * per : (self.rank + 1) * per]

    # ------------------------------------------------------------------ loop
    def _train_step(self, step: int) -> StepReport:
        cfg = self.config
        memory.reset_peak()
        t0 = time.perf_counter()
        grads: Any = None
        total, count, tokens = mx.array(0.0), mx.array(0.0), 0
        for a in range(cfg.grad_accum):
            examples = [self.train_set.examples[i] for i in self._local_batch((step - 1) * cfg.grad_accum + a)]
            batch = collate(examples, self.pad_id)
            if cfg.dropout > 0:
                set_dropout_keys(self.model, _dropout_key(cfg.seed, step, a, self.rank))
            (s, n), g = self._loss_and_grad(self.model, batch.inputs, batch.targets, batch.weights)
            grads, total, count = add_trees(grads, g), total + s, count + n
            mx.eval(grads, total, count)
            tokens += batch.num_tokens
        sums = all_sum({"g": grads, "loss": total, "count": count, "tokens": mx.array(float(tokens))}, self.group)
        n_targets = mx.maximum(sums["count"], 1.0)
        grads, norm = clip_gradients(scale_tree(sums["g"], 1.0 / n_targets), cfg.grad_clip)
        self.optimizer.update(self.model, grads)
        loss = sums["loss"] / n_targets
        mx.eval(self.model.trainable_parameters(), self.optimizer.state, loss, norm)
        elapsed = time.perf_counter() - t0
        global_tokens = int(sums["tokens"].item())
        lr_used = float(self.optimizer.learning_rate.item())  # the scheduler's value for this update
        return StepReport(
            step=step,
            total_steps=self.total_steps,
            loss=float(loss.item()),
            learning_rate=lr_used,
            grad_norm=float(norm.item()),
            tokens=global_tokens,
            target_tokens=int(sums["count"].item()),
            tokens_per_s=global_tokens / elapsed if elapsed > 0 else 0.0,
            peak_memory=memory.peak(),
        )

    def validate(self) -> EvalResult | None:
        """Validation loss and perplexity (None without a valid.jsonl)."""
        if self.valid_set is None:
            return None
        return evaluate(
            self.model,
            self.valid_set,
            batch_size=self.config.batch_size,
            max_batches=self.config.val_batches,
            pad_id=self.pad_id,
            group=self.group,
        )

    def steps(self) -> Iterator[StepReport]:
        """Train, yielding a :class:`StepReport` after each optimizer step.

        Stopping early (``break``) leaves the last checkpoint in place for ``resume``; the
        final adapter, plot and history are written by :meth:`finish` (or :meth:`run`).
        """
        cfg = self.config
        bar = None
        if not cfg.quiet and self.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, unit="step", file=sys.stderr, dynamic_ncols=True)
        if cfg.grad_checkpoint:
            checkpoint_layers(self.model)
        self.model.train()
        last_val: EvalResult | None = None
        try:
            while self.step < self.total_steps:
                report = self._train_step(self.step + 1)
                self.step = report.step
                self.trained_tokens += report.tokens
                self.history.append((report.step, report.loss))
                last = self.step == self.total_steps
                if self.valid_set is not None and ((cfg.val_every and self.step % cfg.val_every == 0) or last):
                    last_val = self.validate()
                    assert last_val is not None
                    self.val_history.append((self.step, last_val.loss))
                    report = StepReport(**{**report.__dict__, "val": last_val})
                    logger.info(
                        "step %d: val loss %.4f, perplexity %.3f", self.step, last_val.loss, last_val.perplexity
                    )
                if cfg.save_every and self.step % cfg.save_every == 0 and self.rank == 0:
                    save_checkpoint(
                        cfg.adapter_path, self.step, self.model, self.optimizer, self.adapter_config, self._state()
                    )
                if bar is not None:
                    post = {
                        "loss": f"{report.loss:.3f}",
                        "tok/s": f"{report.tokens_per_s:.0f}",
                        "peak": f"{report.peak_memory / 2**20:.0f}MiB",
                        "lr": f"{report.learning_rate:.2e}",
                    }
                    if last_val is not None:
                        post["val"] = f"{last_val.loss:.3f}"
                        post["ppl"] = f"{last_val.perplexity:.2f}"
                    bar.set_postfix(post, refresh=False)
                    bar.update(1)
                yield report
        finally:
            if bar is not None:
                bar.close()
            if cfg.grad_checkpoint:
                uncheckpoint_layers(self.model)
            set_dropout_keys(self.model, None)
            self.model.eval()

    def finish(self) -> TrainResult:
        """Write the adapter, ``loss_curve.png`` and ``history.json`` (process 0 only)."""
        out = Path(self.config.adapter_path)
        plot = None
        if self.rank == 0:
            save_adapter(self.model, out, self.adapter_config)
            if self.history:
                plot = write_loss_curve(out / LOSS_CURVE, self.history, self.val_history)
            from lmx.runtime.files import write_bytes

            record = {"train": self.history, "valid": self.val_history, "trained_tokens": self.trained_tokens}
            write_bytes(out / HISTORY, (json.dumps(record) + "\n").encode())
        return TrainResult(
            adapter_path=out,
            steps=self.step,
            history=list(self.history),
            val_history=list(self.val_history),
            loss_curve=plot,
            trainable_parameters=trainable_count(self.model),
        )

    def run(self) -> TrainResult:
        """Train to the end, then :meth:`finish`. Returns the :class:`TrainResult`."""
        t0 = time.perf_counter()
        final_val = None
        for report in self.steps():
            final_val = report.val or final_val
        result = self.finish()
        result.final_val = final_val
        result.elapsed_s = time.perf_counter() - t0
        return result


def train(config: TrainConfig, **kwargs: Any) -> TrainResult:
    """Train as ``config`` says (see :class:`Trainer` for ``kwargs`` and errors)."""
    return Trainer(config, **kwargs).run()


def _dropout_key(seed: int, step: int, micro_batch: int, rank: int) -> mx.array:
    """The dropout key of one micro-batch: a function of where it is in the run, nothing else."""
    return mx.random.key(int(np.random.SeedSequence([seed, step, micro_batch, rank]).generate_state(1)[0]))

"""``TrainConfig``: the single source of ``lmx train``'s flags and of its YAML keys.

Every field becomes a flag (``batch_size`` -> ``--batch-size``; booleans also get
``--no-...``) and a YAML key (``batch_size`` or ``batch-size``). Flags given on the command
line override the YAML file, which overrides the defaults. Values are checked when a
:class:`TrainConfig` is built, so a bad value fails with a message naming it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmx.errors import InvalidOptionError

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The projections LoRA may wrap (those of Gemma 3 and Qwen 3 decoder layers)."""

SCHEDULES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """How to fine-tune a model with LoRA. See ``lmx train --help`` for each field.

    Raises:
        InvalidOptionError: (on construction) a value is out of range or of the wrong type;
            the message names the field and what it allows.
    """

    model: str | None = field(default=None, metadata={"help": "HF model dir or .gguf file (default: bundled model)"})
    data: str = field(
        default="", metadata={"help": "dir with train.jsonl (and valid.jsonl), or one .jsonl file (required)"}
    )
    adapter_path: str = field(default="adapters", metadata={"help": "dir to write the adapter, checkpoints, plot"})
    device: str | None = field(default=None, metadata={"help": "cpu or gpu (default: LMX_DEVICE, else GPU)"})
    dtype: str = field(default="auto", metadata={"help": "base weights: auto, float32, bfloat16, float16"})
    # LoRA
    rank: int = field(default=8, metadata={"help": "LoRA rank"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / rank"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input, in [0, 1)"})
    num_layers: int = field(default=-1, metadata={"help": "adapt the last N decoder layers (-1: all)"})
    targets: tuple[str, ...] = field(
        default=LORA_TARGETS, metadata={"help": "comma-separated projections to adapt: " + ",".join(LORA_TARGETS)}
    )
    # Optimisation
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate (AdamW)"})
    min_lr: float = field(default=0.0, metadata={"help": "learning rate at the end of the decay"})
    warmup: int = field(default=0, metadata={"help": "steps of linear warm-up up to --lr"})
    schedule: str = field(default="cosine", metadata={"help": "decay after warm-up: " + ", ".join(SCHEDULES)})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW decoupled weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm to this (0: off)"})
    batch_size: int = field(default=4, metadata={"help": "sequences per micro-batch, over all processes"})
    iters: int = field(default=0, metadata={"help": "optimizer steps (give this or --epochs; neither: 1 epoch)"})
    epochs: int = field(default=0, metadata={"help": "passes over train.jsonl (instead of --iters)"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    grad_checkpoint: bool = field(default=False, metadata={"help": "recompute layer activations in backward"})
    max_seq_len: int = field(default=2048, metadata={"help": "truncate longer examples to this many tokens"})
    mask_prompt: bool = field(default=False, metadata={"help": "only completion/assistant tokens count in the loss"})
    # Evaluation, checkpoints, output
    val_every: int = field(default=100, metadata={"help": "validate every N steps (0: only at the end)"})
    val_batches: int = field(default=25, metadata={"help": "validation batches per validation (-1: all)"})
    save_every: int = field(default=100, metadata={"help": "write a resumable checkpoint every N steps (0: off)"})
    resume: bool = field(default=False, metadata={"help": "continue from the checkpoint in --adapter-path"})
    seed: int = field(default=0, metadata={"help": "seed of LoRA init, data order and dropout"})
    quiet: bool = field(default=False, metadata={"help": "no progress bar"})

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
        self._check()

    def _check(self) -> None:
        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise InvalidOptionError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

        need(self.rank >= 1, "rank", ">= 1")
        need(self.alpha > 0, "alpha", "> 0")
        need(0 <= self.dropout < 1, "dropout", "in [0, 1)")
        need(self.num_layers == -1 or self.num_layers >= 1, "num_layers", "-1 (all) or >= 1")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        need(bool(self.targets) and not bad, "targets", "a non-empty subset of " + ",".join(LORA_TARGETS))
        need(self.lr > 0, "lr", "> 0")
        need(0 <= self.min_lr <= self.lr, "min_lr", f"in [0, lr={self.lr}]")
        need(self.warmup >= 0, "warmup", ">= 0")
        need(self.schedule in SCHEDULES, "schedule", "one of " + ", ".join(SCHEDULES))
        need(self.weight_decay >= 0, "weight_decay", ">= 0")
        need(self.grad_clip >= 0, "grad_clip", ">= 0 (0 turns clipping off)")
        need(self.batch_size >= 1, "batch_size", ">= 1")
        need(self.iters >= 0, "iters", ">= 0")
        need(self.epochs >= 0, "epochs", ">= 0")
        if self.iters and self.epochs:
            raise InvalidOptionError(f"give iters or epochs, not both (got iters={self.iters}, epochs={self.epochs})")
        need(self.grad_accum >= 1, "grad_accum", ">= 1")
        need(self.max_seq_len >= 2, "max_seq_len", ">= 2")
        need(self.val_every >= 0, "val_every", ">= 0")
        need(self.val_batches == -1 or self.val_batches >= 1, "val_batches", "-1 (all) or >= 1")
        need(self.save_every >= 0, "save_every", ">= 0")
        need(self.seed >= 0, "seed", ">= 0")
        need(self.device in (None, "cpu", "gpu"), "device", "cpu or gpu")

    # ------------------------------------------------------------------ building
    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a dict whose keys are field names (``-`` or ``_`` between words).

        Raises:
            InvalidOptionError: an unknown key (named, with the allowed keys) or a bad value.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            name = str(key).replace("-", "_")
            if name not in names:
                raise InvalidOptionError(f"{source}: unknown key {key!r}; allowed: {', '.join(sorted(names))}")
            kwargs[name] = value
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """Read a YAML mapping of fields; ``overrides`` (e.g. command-line flags) win.

        Raises:
            InvalidOptionError: the file is missing, not a mapping, or holds a bad key or value.
        """
        import yaml

        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except OSError as e:
            raise InvalidOptionError(f"cannot read config file {p}: {e}") from e
        except yaml.YAMLError as e:
            raise InvalidOptionError(f"config file {p} is not valid YAML: {e}") from e
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise InvalidOptionError(f"config file {p} must hold a mapping of keys, got {type(data).__name__}")
        values = {str(k).replace("-", "_"): v for k, v in data.items()}
        values.update(overrides or {})
        return cls.from_dict(values, str(p))

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-ready values (``targets`` as a list)."""
        out = dataclasses.asdict(self)
        out["targets"] = list(self.targets)
        return out

    # ------------------------------------------------------------------ command line
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add one flag per field, plus ``--config FILE.yaml``. Unset flags stay absent from
        the parsed namespace, so they do not override the YAML file."""
        parser.add_argument("--config", "-c", default=argparse.SUPPRESS, help="YAML file of these settings")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            help_text = f.metadata.get("help", "")
            if "default" not in help_text and f.default not in (None, ""):
                help_text += f" (default: {_show(f.default)})"
            kind = _base_type(hints[f.name])
            # --adapter: the name every other command uses for an adapter directory
            flags = {"model": [flag, "-m"], "adapter_path": ["--adapter", flag]}.get(f.name, [flag])
            if kind is bool:
                parser.add_argument(
                    *flags,
                    action=argparse.BooleanOptionalAction,
                    default=argparse.SUPPRESS,
                    help=help_text,
                    dest=f.name,
                )
            else:
                parser.add_argument(
                    *flags, type=str, default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_text, dest=f.name
                )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainConfig:
        """Build from flags parsed with :meth:`add_arguments` (and their ``--config`` file).

        Raises:
            InvalidOptionError: a bad value, key or file.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        given = {k: v for k, v in vars(args).items() if k in names}
        config = getattr(args, "config", None)
        if config:
            return cls.from_yaml(config, given)
        return cls.from_dict(given, "command line")


def _show(value: Any) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


def _base_type(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)] if isinstance(hint, types.UnionType) else []
    return args[0] if args else typing.get_origin(hint) or hint


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the field's annotation; strings from the command line are parsed."""
    optional = isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("", "none", "null")):
        if optional:
            return None
        raise InvalidOptionError(f"{name} must not be empty")
    kind = _base_type(hint)
    if kind is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
            raise InvalidOptionError(f"{name} must be a comma-separated string or a list of strings, got {value!r}")
        return tuple(i.strip() for i in items if i.strip())
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise InvalidOptionError(f"{name} must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        elif isinstance(value, int) and not isinstance(value, bool):
            return value
        raise InvalidOptionError(f"{name} must be an integer, got {value!r}")
    if kind is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise InvalidOptionError(f"{name} must be a number, got {value!r}") from None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise InvalidOptionError(f"{name} must be a finite number, got {value!r}")
    if kind is str:
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
        raise InvalidOptionError(f"{name} must be a string, got {value!r}")
    return value

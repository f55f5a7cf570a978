"""Fine-tuning: LoRA adapters, JSONL data, losses, the trainer, evaluation and fusing.

>>> from lmx.train import TrainConfig, train
>>> result = train(TrainConfig(model="path/to/model", data="data/", iters=100))
"""

from __future__ import annotations

from lmx.train.config import TrainConfig
from lmx.train.data import DatasetError, load_jsonl
from lmx.train.evaluate import EvalResult, evaluate
from lmx.train.lora import (
    AdapterConfig,
    LoRALinear,
    apply_lora,
    fuse_lora,
    load_adapter,
    save_adapter,
    unload_adapter,
)
from lmx.train.trainer import StepReport, Trainer, TrainResult, train

__all__ = [
    "AdapterConfig",
    "DatasetError",
    "EvalResult",
    "LoRALinear",
    "StepReport",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "apply_lora",
    "evaluate",
    "fuse_lora",
    "load_adapter",
    "load_jsonl",
    "save_adapter",
    "train",
    "unload_adapter",
]

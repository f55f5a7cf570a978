"""``lmx train``: fine-tune a model with LoRA (flags and YAML keys come from ``TrainConfig``).

Under ``mlx.launch`` (``mlx.launch -n 2 --backend ring -- lmx train ...``) each process
trains on its share of every batch and gradients are summed with ``mlx.distributed``.
"""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    from lmx.train.config import TrainConfig

    p = sub.add_parser(
        "train",
        help="fine-tune with LoRA on JSONL data",
        description="Fine-tune with LoRA. Every flag is also a key of the --config YAML file; flags win.",
    )
    TrainConfig.add_arguments(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lmx.train.config import TrainConfig
    from lmx.train.trainer import Trainer

    config = TrainConfig.from_args(args)
    trainer = Trainer(config)
    result = trainer.run()
    if trainer.rank != 0:
        return 0
    summary = {
        "adapter_path": str(result.adapter_path),
        "steps": result.steps,
        "trainable_parameters": result.trainable_parameters,
        "final_train_loss": result.history[-1][1] if result.history else None,
        "val_loss": result.final_val.loss if result.final_val else None,
        "val_perplexity": result.final_val.perplexity if result.final_val else None,
        "loss_curve": str(result.loss_curve) if result.loss_curve else None,
        "elapsed_s": round(result.elapsed_s, 3),
        "processes": trainer.world,
    }
    if getattr(args, "json", False):
        print(json.dumps(summary, indent=2))
    else:
        for key, value in summary.items():
            print(f"{key}: {value}")
    return 0

"""AdamW with warm-up and decay, gradient clipping, and data-parallel gradient sums."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten


def lr_schedule(
    lr: float, total_steps: int, *, warmup: int = 0, schedule: str = "cosine", min_lr: float = 0.0
) -> Callable[[mx.array], mx.array]:
    """Learning rate per optimizer step: linear warm-up from 0 over ``warmup`` steps, then
    ``schedule`` (cosine, linear or constant) from ``lr`` down to ``min_lr`` at ``total_steps``.

    The optimizer evaluates it at steps 0, 1, ...; step ``s`` trains with ``schedule(s)``.
    """
    decay_steps = max(total_steps - warmup, 1)
    if schedule == "cosine":
        decay = optim.cosine_decay(lr, decay_steps, min_lr)
    elif schedule == "linear":
        decay = optim.linear_schedule(lr, min_lr, decay_steps)
    else:

        def decay(step: mx.array) -> mx.array:
            return mx.array(lr, mx.float32)

    if warmup <= 0:
        return decay
    # Warm-up reaches lr at step `warmup`; its first step trains with lr / warmup, not 0.
    ramp = optim.linear_schedule(lr / warmup, lr, warmup)
    return optim.join_schedules([ramp, decay], [warmup])


def make_optimizer(lr: Callable[[mx.array], mx.array] | float, weight_decay: float) -> optim.AdamW:
    """AdamW (bias-corrected, as PyTorch's) with the given learning rate or schedule."""
    return optim.AdamW(learning_rate=lr, weight_decay=weight_decay, bias_correction=True)


def clip_gradients(grads: Any, max_norm: float) -> tuple[Any, mx.array]:
    """Scale ``grads`` so their global norm is at most ``max_norm`` (0: no clipping).

    Returns:
        The gradients and their norm before clipping.
    """
    if max_norm <= 0:
        norm = mx.sqrt(sum((g.astype(mx.float32).square().sum() for _, g in tree_flatten(grads)), mx.array(0.0)))
        return grads, norm
    return optim.clip_grad_norm(grads, max_norm)


def all_sum(tree: Any, group: mx.distributed.Group | None) -> Any:
    """Sum a tree of float arrays over the processes of ``group`` in one collective.

    A single process (or ``group`` None) gets its tree back unchanged.
    """
    if group is None or group.size() == 1:
        return tree
    flat = tree_flatten(tree)
    if not flat:
        return tree
    shapes = [v.shape for _, v in flat]
    sizes = [v.size for _, v in flat]
    dtypes = [v.dtype for _, v in flat]
    vector = mx.concatenate([v.astype(mx.float32).reshape(-1) for _, v in flat])
    vector = mx.distributed.all_sum(vector, group=group)
    bounds, total = [], 0
    for s in sizes[:-1]:
        total += s
        bounds.append(total)
    parts = mx.split(vector, bounds) if bounds else [vector]
    return tree_unflatten(
        [(k, p.reshape(shape).astype(dt)) for (k, _), p, shape, dt in zip(flat, parts, shapes, dtypes)]
    )


def scale_tree(tree: Any, factor: mx.array | float) -> Any:
    """Multiply every array of ``tree`` by ``factor``."""
    return tree_map(lambda g: g * factor, tree)


def add_trees(a: Any | None, b: Any) -> Any:
    """Element-wise ``a + b`` (``a`` None: ``b``)."""
    return b if a is None else tree_map(lambda x, y: x + y, a, b)

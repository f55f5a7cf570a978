"""The first ``n`` steps of :func:`lmx.generate.step.generate_step`, as the decode tests compare them."""

from __future__ import annotations

import numpy as np

from lmx.generate.sampling import KeySequence, make_sampler
from lmx.generate.step import generate_step


def first_steps(model, prompt, n: int, *, cache=None, temperature=0.0, seed=0, **options):
    """Tokens (a list per step) and log-probabilities (n, B, V) of the first ``n`` steps from
    ``prompt``; ``options`` go to ``generate_step`` (``state``, ``segments``, ``pad``,
    ``processors``). The generator is closed after the last."""
    steps = generate_step(
        model,
        prompt,
        model.make_cache() if cache is None else cache,
        make_sampler(temperature),
        KeySequence(seed).next,
        **options,
    )
    tokens, logprobs = [], []
    for token, lp in steps:
        tokens.append(token.tolist())
        logprobs.append(np.array(lp))
        if len(tokens) == n:
            break
    steps.close()
    return tokens, np.stack(logprobs)

"""``lmx bench --speculative``: speculative decoding against plain decoding, side by side.

Each task is a chat request whose answer copies from its prompt (editing code, quoting,
summarising a given text): the work prompt lookup is for. Every repeat runs every task plainly
and speculatively, one after the other (the order alternating between repeats), on one engine,
so both see the same machine load; the greedy outputs must be equal token for token, and the
result says whether they were. Reported per task and over all: decode tokens/s (tokens after
the first over the time from the first to the last), the acceptance rate (accepted drafts over
drafted tokens) and the tokens each verify pass gave.

This sits beside the engine (it runs requests through it), above :mod:`lmx.bench`, which times
the bare step loop.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from lmx.errors import InvalidOptionError
from lmx.generate.options import SPECULATIVE_MODES

TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based inks and a wooden press adapted from wine making. "
    "Within fifty years, presses were running in more than two hundred cities across Europe, and "
    "the price of books fell so far that reading spread beyond monasteries and universities."
)
CODE = """def mean(values):
    total = 0
    for value in values:
        total = total + value
    return total / len(values)


def variance(values):
    m = mean(values)
    total = 0
    for value in values:
        total = total + (value - m) ** 2
    return total / len(values)
"""
TASKS: dict[str, str] = {
    "rename-variable": "Rename the variable `total` to `acc` in this Python code and return the whole code:\n\n"
    f"```python\n{CODE}```",
    "add-docstrings": f"Add a docstring to each function in this Python code. Return the whole code.\n\n```python\n{CODE}```",
    "quote": f"Here is a text:\n\n{TEXT}\n\nQuote the first two sentences of the text.",
    "summarise": f"Summarise the following text in two sentences, reusing its wording:\n\n{TEXT}",
}
"""The copying tasks: a chat message each (the model's chat template wraps it)."""


@dataclass
class TaskRun:
    """One task run plainly and speculatively (one repeat)."""

    task: str
    tokens: int
    plain_tokens_per_s: float
    speculative_tokens_per_s: float
    draft_tokens: int
    accepted_tokens: int
    verify_passes: int
    identical: bool


@dataclass
class SpeculativeBench:
    """What :func:`run_speculative_benchmark` measured; medians over the runs are the headline."""

    model: str
    draft_model: str | None
    device: str
    mode: str
    num_draft_tokens: int
    prompt_lookup_ngram: int
    gen_tokens: int
    runs: list[TaskRun] = field(default_factory=list)

    def _median(self, runs: list[TaskRun], name: str) -> float:
        return statistics.median(getattr(r, name) for r in runs) if runs else 0.0

    def summary(self, runs: list[TaskRun]) -> dict[str, Any]:
        """Over ``runs``: median tokens/s each way; the speed-up as the median of each pair's
        ratio (the two runs of a pair are back to back, so they share the machine's load) and
        as total plain decode time over total speculative decode time; the acceptance rate and
        the tokens each verify pass gave."""
        drafted = sum(r.draft_tokens for r in runs)
        passes = sum(r.verify_passes for r in runs)
        plain_s = sum((r.tokens - 1) / r.plain_tokens_per_s for r in runs if r.plain_tokens_per_s)
        spec_s = sum((r.tokens - 1) / r.speculative_tokens_per_s for r in runs if r.speculative_tokens_per_s)
        ratios = [r.speculative_tokens_per_s / r.plain_tokens_per_s for r in runs if r.plain_tokens_per_s]
        return {
            "plain_tokens_per_s": self._median(runs, "plain_tokens_per_s"),
            "speculative_tokens_per_s": self._median(runs, "speculative_tokens_per_s"),
            "speedup": statistics.median(ratios) if ratios else 0.0,
            "speedup_total_time": plain_s / spec_s if spec_s else 0.0,
            "acceptance_rate": sum(r.accepted_tokens for r in runs) / drafted if drafted else 0.0,
            "tokens_per_verify_pass": sum(r.tokens - 1 for r in runs) / passes if passes else 0.0,
            "identical": all(r.identical for r in runs),
        }

    def as_dict(self) -> dict[str, Any]:
        tasks = sorted({r.task for r in self.runs}, key=list(TASKS).index)
        return {
            "model": self.model,
            "draft_model": self.draft_model,
            "device": self.device,
            "mode": self.mode,
            "num_draft_tokens": self.num_draft_tokens,
            "prompt_lookup_ngram": self.prompt_lookup_ngram,
            "gen_tokens": self.gen_tokens,
            "repeat": len(self.runs) // max(1, len(tasks)),
            "all": self.summary(self.runs),
            "tasks": {t: self.summary([r for r in self.runs if r.task == t]) for t in tasks},
            "runs": [asdict(r) for r in self.runs],
        }


def run_speculative_benchmark(
    model: str | None = None,
    *,
    mode: str = "prompt-lookup",
    draft_model: str | None = None,
    num_draft_tokens: int = 4,
    prompt_lookup_ngram: int = 3,
    gen_tokens: int = 128,
    repeat: int = 3,
    device: str | None = None,
    dtype: str = "auto",
    tasks: list[str] | None = None,
    on_run: Callable[[TaskRun], None] | None = None,
) -> SpeculativeBench:
    """Time plain and speculative greedy decoding of the copying :data:`TASKS`, interleaved.

    Args:
        model: the model (None: the bundled Gemma 3 270M).
        mode: ``"prompt-lookup"`` or ``"draft-model"`` (needs ``draft_model``).
        draft_model: the draft model's path.
        num_draft_tokens, prompt_lookup_ngram: as the generation options.
        gen_tokens: tokens generated per request (greedy, up to EOS).
        repeat: runs of every task each way.
        device, dtype: as :func:`lmx.load`.
        tasks: names from :data:`TASKS` (None: all).
        on_run: called with each task run as it finishes.

    Raises:
        InvalidOptionError: a bad mode, task name or count.
    """
    from lmx.engine import load
    from lmx.runtime.device import device_name

    if mode not in SPECULATIVE_MODES:
        raise InvalidOptionError(f"speculative must be one of {', '.join(SPECULATIVE_MODES)}, got {mode!r}")
    if mode == "draft-model" and draft_model is None:
        raise InvalidOptionError("--speculative draft-model needs --draft-model PATH")
    names = list(TASKS) if tasks is None else tasks
    for name in names:
        if name not in TASKS:
            raise InvalidOptionError(f"task must be one of {', '.join(TASKS)}, got {name!r}")
    for opt, value, low in (("gen_tokens", gen_tokens, 2), ("repeat", repeat, 1)):
        if value < low:
            raise InvalidOptionError(f"{opt} must be >= {low}, got {value}")
    engine = load(model, device=device, dtype=dtype, prompt_cache=False, draft_model=draft_model, speculative=None)
    with engine:
        result = SpeculativeBench(
            model=engine.info().source,
            draft_model=None if engine.draft is None else engine.draft.source,
            device=device_name(),
            mode=mode,
            num_draft_tokens=num_draft_tokens,
            prompt_lookup_ngram=prompt_lookup_ngram,
            gen_tokens=gen_tokens,
        )
        spec = {"speculative": mode, "num_draft_tokens": num_draft_tokens, "prompt_lookup_ngram": prompt_lookup_ngram}
        engine.chat([{"role": "user", "content": "Hello"}], max_tokens=8)  # warm-up
        engine.chat([{"role": "user", "content": "Hello"}], max_tokens=8, **spec)
        for i in range(repeat):
            for name in names:
                messages = [{"role": "user", "content": TASKS[name]}]
                done: dict[bool, Any] = {}
                passes = 0
                for speculative in [False, True] if i % 2 == 0 else [True, False]:
                    before = engine.stats().speculative_steps
                    options = spec if speculative else {"speculative": None}
                    done[speculative] = engine.chat(messages, max_tokens=gen_tokens, **options)
                    passes += engine.stats().speculative_steps - before  # none in the plain run
                plain, fast = done[False], done[True]
                run = TaskRun(
                    task=name,
                    tokens=len(fast.tokens),
                    plain_tokens_per_s=plain.metrics.decode_tokens_per_s,
                    speculative_tokens_per_s=fast.metrics.decode_tokens_per_s,
                    draft_tokens=fast.metrics.draft_tokens,
                    accepted_tokens=fast.metrics.accepted_tokens,
                    verify_passes=passes,
                    identical=plain.tokens == fast.tokens,
                )
                result.runs.append(run)
                if on_run is not None:
                    on_run(run)
    return result


__all__ = ["TASKS", "SpeculativeBench", "TaskRun", "run_speculative_benchmark"]

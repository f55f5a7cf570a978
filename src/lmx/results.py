"""What the engine returns: tokens, completions, metrics, model info."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class Token:
    """One generated token.

    Attributes:
        id: the token id.
        text: text released at this step (may be "" while a character or a possible stop
            string is still incomplete, or hold text of earlier tokens released now).
        logprob: log-probability of ``id`` under the model's (processed) distribution.
        top_logprobs: the most likely alternatives ``(id, logprob)`` when asked for.
        finish_reason: set on the last token: ``"stop"`` (EOS, stop string or stop id)
            or ``"length"`` (max_tokens or the context length).
    """

    id: int
    text: str
    logprob: float
    top_logprobs: tuple[tuple[int, float], ...] | None = None
    finish_reason: FinishReason | None = None


@dataclass
class GenerationMetrics:
    """Counts and speeds of one request (seconds, tokens/s, bytes)."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    time_to_first_token: float = 0.0
    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    total_time: float = 0.0
    peak_memory: int = 0
    active_memory: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Completion:
    """The result of :meth:`lmx.Engine.generate` / :meth:`lmx.Engine.chat`.

    Attributes:
        text: the generated text (stop string excluded).
        tokens: the generated ids (the EOS or stop token that ended it included).
        finish_reason: ``"stop"`` or ``"length"``.
        metrics: counts and speeds.
        logprobs: per generated token, its logprob (when asked for).
        top_logprobs: per generated token, the top alternatives (when asked for).
    """

    text: str
    tokens: list[int]
    finish_reason: FinishReason
    metrics: GenerationMetrics = field(default_factory=GenerationMetrics)
    logprobs: list[float] | None = None
    top_logprobs: list[tuple[tuple[int, float], ...]] | None = None


@dataclass(frozen=True)
class ModelInfo:
    """What :meth:`lmx.Engine.info` reports."""

    name: str
    source: str
    model_type: str
    num_parameters: int
    num_layers: int
    hidden_size: int
    vocab_size: int
    context_length: int
    dtype: str
    quantization: dict[str, int] | None
    device: str
    weights_bytes: int
    profile: dict[str, Any] | None = None  # the device profile chosen at load (lmx.runtime.profile)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

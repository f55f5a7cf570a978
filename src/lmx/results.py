"""What the engine returns: tokens, completions, metrics, model info."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length", "cancelled"]


class TopLogprob(tuple):
    """One alternative of :attr:`Token.top_logprobs`: the tuple ``(id, logprob)`` as before (it
    unpacks and compares as a pair), with the token's text as ``.text`` (special tokens spelled
    out, as an OpenAI ``top_logprobs`` entry shows them)."""

    text: str

    def __new__(cls, id: int, logprob: float, text: str) -> TopLogprob:
        obj = super().__new__(cls, (id, logprob))
        obj.text = text
        return obj

    @property
    def id(self) -> int:
        return self[0]

    @property
    def logprob(self) -> float:
        return self[1]

    def __repr__(self) -> str:
        return f"TopLogprob(id={self[0]}, logprob={self[1]!r}, text={self.text!r})"

    def __reduce__(self) -> tuple:
        return (TopLogprob, (self[0], self[1], self.text))


@dataclass(frozen=True)
class ToolCall:
    """One function call a chat reply made (see :mod:`lmx.generate.tools`).

    Attributes:
        id: ``call_<24 hex digits>``, fresh for each parsed call.
        name: the function's name.
        arguments: the arguments, as JSON text of an object.
    """

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Token:
    """One generated token.

    Attributes:
        id: the token id.
        text: text released at this step (may be "" while a character or a possible stop
            string is still incomplete, or hold text of earlier tokens released now).
        logprob: log-probability of ``id`` under the model's (processed) distribution.
        top_logprobs: the most likely alternatives when asked for: :class:`TopLogprob` pairs
            ``(id, logprob)`` with ``.text``.
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
    draft_tokens: int = 0  # speculative decoding: tokens drafted, and how many of them were accepted
    accepted_tokens: int = 0

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
        tool_calls: the function calls of a :meth:`lmx.Engine.chat` reply given ``tools``
            (``text`` is then the rest of the reply); empty otherwise.
    """

    text: str
    tokens: list[int]
    finish_reason: FinishReason
    metrics: GenerationMetrics = field(default_factory=GenerationMetrics)
    logprobs: list[float] | None = None
    top_logprobs: list[tuple[tuple[int, float], ...]] | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)


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
    # "model": the model's own chat template; "architecture": it has none, lmx's template for its
    # architecture is used (a base model: chat answers are continuations); "none": chat is refused
    chat_template: str = "model"
    compute_dtype: str = ""  # the dtype activations are computed in
    gguf_file_type: str | None = None  # a GGUF file's quantization mix, llama.cpp's name ("Q4_K_M")
    gguf_types: dict[str, int] | None = None  # tensors of each GGML type in the GGUF file
    kernel_types: dict[str, int] | None = None  # matrices run as GGUF blocks by lmx's CPU kernels, per type
    # GGUF matrices held as MLX affine quantized layers, per GGML type: {"Q4_K": {"runs_as": "mlx affine
    # q4 g32", "matrices": 27}}; the other GGUF types were dequantized to ``dtype``
    affine_types: dict[str, dict[str, Any]] | None = None
    # split over processes (tensor or pipeline parallel): {"size", "rank", "backend", "split"
    # ("tensor-parallel" or "pipeline-parallel"), "holds": {part: what this rank holds}, "ranks"};
    # num_parameters and weights_bytes then count this rank's part
    tensor_parallel: dict[str, Any] | None = None
    # the KV cache: bits of its keys and values (None: the compute dtype), elements per scale when
    # quantized, and bytes one position of context takes in one row (every layer, keys and values)
    kv_bits: int | None = None
    kv_group_size: int | None = None
    kv_bytes_per_token: int = 0

    @property
    def runs_as(self) -> str:
        """One line saying what runs: the quantized blocks and the compute dtype, or plain weights."""
        if self.kernel_types:
            blocks = ", ".join(f"{n} {t}" for t, n in self.kernel_types.items())
            mix = f"GGUF {self.gguf_file_type} " if self.gguf_file_type else "GGUF "
            return (
                f"{mix}blocks on lmx's CPU kernels ({blocks} matrices); other weights and compute {self.compute_dtype}"
            )
        if self.affine_types:
            held = ", ".join(f"{v['matrices']} {t} as {v['runs_as']}" for t, v in self.affine_types.items())
            mix = f"GGUF {self.gguf_file_type} " if self.gguf_file_type else "GGUF "
            return f"{mix}matrices as MLX quantized layers ({held}); other weights {self.dtype}, compute {self.compute_dtype}"
        if self.quantization and self.quantization.get("bits"):
            return f"MLX {self.quantization['bits']}-bit quantized weights; compute {self.compute_dtype}"
        origin = f" (dequantized from GGUF {self.gguf_file_type})" if self.gguf_file_type else ""
        return f"{self.dtype} weights{origin}; compute {self.compute_dtype}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

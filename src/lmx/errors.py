"""The lmx exception hierarchy.

Every error lmx raises on purpose is an :class:`LmxError`. Errors about a value the
caller passed (an option, a prompt) also subclass :class:`ValueError`, so code that
already catches ``ValueError`` keeps working. Messages name the bad value and what
was allowed.
"""

from __future__ import annotations


class LmxError(Exception):
    """Base class of every error raised by lmx."""


class ModelNotFoundError(LmxError, FileNotFoundError):
    """The named model (path, file or directory) does not exist or holds no model."""


class UnsupportedModelError(LmxError):
    """The model's architecture (``model_type``) or a feature of it is not supported."""


class ConfigError(LmxError, ValueError):
    """A model configuration is missing a required key or holds a value of the wrong type."""


class WeightsError(LmxError):
    """Weights are missing, unexpected, mis-shaped, of an unknown dtype, or corrupt."""


class TokenizerError(LmxError):
    """The tokenizer files are missing or malformed, or text could not be (de)tokenized."""


class ChatTemplateError(TokenizerError):
    """A chat template failed while rendering: it raised (``raise_exception``, a division by
    zero, a type error...) or it reached a limit of :class:`lmx.tokenizer.TemplateLimits`
    (time, output size, nesting depth)."""


class ContextLengthError(LmxError, ValueError):
    """The prompt (plus the requested tokens) does not fit the model's context."""


class ImageError(LmxError, ValueError):
    """An image input could not be used: not an image, truncated, zero-sized, larger than the
    pixel limit (a decompression bomb), or given to a model that reads no images."""


class InvalidOptionError(LmxError, ValueError):
    """A generation or engine option has a bad value: the message names it and the allowed range."""


class OutOfMemoryError(LmxError, MemoryError):
    """An allocation would exceed the memory limit set with :func:`lmx.memory.set_limit`."""


class SaveError(LmxError, OSError):
    """Writing a model, adapter or checkpoint failed (disk full, no permission...); what was
    there before is left as it was."""


class QueueFullError(LmxError):
    """Every batch slot is busy and the wait queue is full (retry later)."""


class EngineClosedError(LmxError):
    """The engine was used after :meth:`lmx.Engine.close`."""


class DraftModelError(LmxError, ValueError):
    """A draft model cannot draft for the model it was paired with: their vocabularies differ
    (speculative decoding checks the drafts as token ids of the target's vocabulary)."""


class GroupLostError(LmxError):
    """A rank of a tensor-parallel group ended or became unreachable: the others cannot go on
    alone (each holds only its slices of the model); restart every rank."""


class AdapterInUseError(LmxError):
    """A LoRA adapter cannot be unloaded: running or waiting requests use it."""


__all__ = [
    "AdapterInUseError",
    "ChatTemplateError",
    "ConfigError",
    "ContextLengthError",
    "DraftModelError",
    "EngineClosedError",
    "GroupLostError",
    "InvalidOptionError",
    "LmxError",
    "ModelNotFoundError",
    "OutOfMemoryError",
    "QueueFullError",
    "SaveError",
    "TokenizerError",
    "UnsupportedModelError",
    "WeightsError",
]

"""Pieces shared by the architectures: config parsing, RoPE variants, attention."""

from __future__ import annotations

import dataclasses
import logging
import math
import types
import typing
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from lmx.errors import ConfigError, UnsupportedModelError

logger = logging.getLogger(__name__)

_CHECKED_TYPES = (bool, int, float, str)


@dataclasses.dataclass
class BaseModelArgs:
    """Base of every ``ModelArgs``: field names match the HF ``config.json`` keys."""

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: str = "config.json") -> BaseModelArgs:
        """Build from a config dict; unknown keys are logged, missing or mistyped ones raise.

        Raises:
            ConfigError: a required key is missing or a value has the wrong type.
        """
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for name, f in fields.items():
            if name not in config:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise ConfigError(f"{source} is missing the required key {name!r}")
                continue
            kwargs[name] = _checked(name, config[name], hints[name], source)
        unknown = sorted(set(config) - set(fields))
        if unknown:
            logger.debug("%s: keys not used by %s: %s", source, cls.__module__, ", ".join(unknown))
        return cls(**kwargs)


def _checked(name: str, value: Any, hint: Any, source: str) -> Any:
    """Check a scalar config value against its annotation (ints accepted for floats)."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return value
    scalars = [t for t in allowed if t in _CHECKED_TYPES]
    if not scalars or len(scalars) != len([t for t in allowed if t is not type(None)]):
        return value  # lists / dicts: checked where they are used
    ok = any(
        (t is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (t is int and isinstance(value, int) and not isinstance(value, bool))
        or (t in (bool, str) and isinstance(value, t))
        for t in scalars
    )
    if not ok:
        want = " or ".join(t.__name__ for t in scalars)
        raise ConfigError(f"{source}: {name!r} must be {want}, got {value!r}")
    if float in scalars and int not in scalars:
        value = float(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{source}: {name!r} must be finite, got {value!r}")
    return value


def rope_settings(
    rope_parameters: dict | None,
    rope_scaling: dict | None,
    rope_theta: float,
    layer_type: str | None = None,
) -> dict[str, Any]:
    """Resolve one layer type's RoPE settings from either config format.

    transformers >= 5 writes ``rope_parameters`` (flat, or keyed by layer type as Gemma 3
    does); older configs write ``rope_theta`` plus ``rope_scaling``.

    Returns:
        A dict with at least ``rope_type`` and ``rope_theta``.
    """
    params: dict[str, Any] = {}
    if rope_parameters:
        if layer_type is not None and layer_type in rope_parameters:
            params = dict(rope_parameters[layer_type] or {})
        elif "rope_type" in rope_parameters or "rope_theta" in rope_parameters:
            params = dict(rope_parameters)
    if not params:
        params = dict(rope_scaling or {})
    params.setdefault("rope_theta", rope_theta)
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


class RoPE(nn.Module):
    """Rotary embedding (non-interleaved, as HF) with default/linear/llama3/yarn scaling."""

    def __init__(self, dims: int, settings: dict[str, Any], max_position_embeddings: int) -> None:
        super().__init__()
        self.dims = dims
        kind = settings["rope_type"]
        base = float(settings["rope_theta"])
        self.scale = 1.0
        self.mscale = 1.0
        self.base: float | None = base
        self._freqs: mx.array | None = None
        exponents = mx.arange(0, dims, 2, dtype=mx.float32) / dims
        if kind == "default":
            pass
        elif kind == "linear":
            self.scale = 1.0 / float(settings["factor"])
        elif kind == "llama3":
            self._freqs, self.base = _llama3_periods(base**exponents, settings, max_position_embeddings), None
        elif kind == "yarn":
            self._freqs, self.mscale = _yarn_periods(base, dims, settings, max_position_embeddings)
            self.base = None
        else:
            raise UnsupportedModelError(
                f"rope_type {kind!r} is not supported; supported: default, linear, llama3, yarn"
            )

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        out = mx.fast.rope(
            x,
            self.dims,
            traditional=False,
            base=self.base,
            scale=self.scale,
            offset=offset,
            freqs=self._freqs,
        )
        return out * self.mscale if self.mscale != 1.0 else out


def _llama3_periods(periods: mx.array, s: dict[str, Any], max_pos: int) -> mx.array:
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s.get("original_max_position_embeddings", max_pos))
    wavelen = 2 * math.pi * periods
    scaled = mx.where(wavelen > old_len / low, periods * factor, periods)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = scaled / ((1 - smooth) / factor + smooth)
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return mx.where(medium, smoothed, scaled)


def _yarn_periods(base: float, dims: int, s: dict[str, Any], max_pos: int) -> tuple[mx.array, float]:
    original = float(s.get("original_max_position_embeddings") or max_pos)
    factor = float(s.get("factor") or max_pos / original)

    def mscale_of(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attention_factor = mscale_of(factor, m) / mscale_of(factor, m_all) if m and m_all else mscale_of(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dims * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dims - 1)
    if low == high:
        high += 0.001
    ramp = mx.clip((mx.arange(dims // 2, dtype=mx.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = 1.0 / base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
    inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    return 1.0 / inv_freq, float(attention_factor)


def attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    scale: float,
    mask: mx.array | None,
    softcap: float | None = None,
) -> mx.array:
    """Scaled dot-product attention over (B, heads, L, D) inputs, grouped-query aware."""
    if softcap is None:
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)
    n_rep = queries.shape[1] // keys.shape[1]
    if n_rep > 1:
        keys, values = mx.repeat(keys, n_rep, axis=1), mx.repeat(values, n_rep, axis=1)
    scores = (queries * scale) @ keys.swapaxes(-1, -2)  # (B, H, Lq, Lk)
    scores = mx.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
    return mx.softmax(scores, axis=-1, precise=True) @ values


def layer_types_from(config_layer_types: list[str] | None, n_layers: int, default: list[str]) -> list[str]:
    """Validate ``layer_types`` (or take ``default``): one of full/sliding_attention per layer."""
    types_ = list(config_layer_types) if config_layer_types is not None else default
    if len(types_) != n_layers:
        raise ConfigError(f"layer_types has {len(types_)} entries for {n_layers} layers")
    bad = sorted({t for t in types_ if t not in ("full_attention", "sliding_attention")})
    if bad:
        raise ConfigError(f"layer_types holds {bad}; allowed: full_attention, sliding_attention")
    return types_

"""Rotary position embeddings: the RoPE layer and its settings (default, linear, llama3, yarn scaling)."""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from lmx.errors import ConfigError, UnsupportedModelError
from lmx.models.base import OpsSlot


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
            per_type = rope_parameters[layer_type] or {}
            if not isinstance(per_type, dict):
                raise ConfigError(f"rope_parameters[{layer_type!r}] must be an object, got {per_type!r:.80}")
            params = dict(per_type)
        elif "rope_type" in rope_parameters or "rope_theta" in rope_parameters:
            params = dict(rope_parameters)
    if not params:
        params = dict(rope_scaling or {})
    params.setdefault("rope_theta", rope_theta)
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


class RoPE(nn.Module):
    """Rotary embedding (non-interleaved, as HF) with default/linear/llama3/yarn scaling."""

    def __init__(
        self, dims: int, settings: dict[str, Any], max_position_embeddings: int, ops: OpsSlot | None = None
    ) -> None:
        super().__init__()
        self.ops_slot = ops or OpsSlot()
        self.dims = dims
        kind = settings["rope_type"]
        if kind not in ("default", "linear", "llama3", "yarn"):
            raise UnsupportedModelError(
                f"rope_type {kind!r} is not supported; supported: default, linear, llama3, yarn"
            )
        self.scale = 1.0
        self.mscale = 1.0
        freqs = None
        try:  # the settings come straight from config.json: a missing or non-numeric value is a ConfigError
            base = float(settings["rope_theta"])
            self.base: float | None = base
            exponents = mx.arange(0, dims, 2, dtype=mx.float32) / dims
            if kind == "linear":
                self.scale = 1.0 / float(settings["factor"])
            elif kind == "llama3":
                freqs, self.base = _llama3_periods(base**exponents, settings, max_position_embeddings), None
            elif kind == "yarn":
                freqs, self.mscale = _yarn_periods(base, dims, settings, max_position_embeddings)
                self.base = None
        except (KeyError, TypeError, ValueError, ZeroDivisionError, OverflowError) as e:
            raise ConfigError(f"RoPE settings {settings!r:.200} are invalid: {type(e).__name__}: {e}") from e
        # Held outside the module's parameter dict (MLX modules drop None-valued entries from
        # attribute lookup), and evaluated now: MLX streams are per thread, and a lazy array
        # first evaluated on another thread (a server worker) fails there.
        self._has_freqs = freqs is not None
        if freqs is not None:
            mx.eval(freqs)
            self._freqs = freqs
        # The periods (angle = position / period), for ops that take them (lmx's kernels).
        self._periods = freqs if freqs is not None else base**exponents
        mx.eval(self._periods)

    @property
    def periods(self) -> mx.array:
        """Each rotated pair's period (angle = position * scale / period), (dims / 2,) float32."""
        return self._periods

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        out = self.ops_slot.ops.rope(
            x,
            self.dims,
            offset,
            base=self.base,
            scale=self.scale,
            freqs=self._freqs if self._has_freqs else None,
            periods=self._periods,
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

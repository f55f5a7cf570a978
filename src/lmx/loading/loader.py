"""Load a model from an HF directory or a GGUF file, all or nothing (:mod:`lmx.loading.find` finds it)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from lmx.errors import ConfigError, InvalidOptionError, ModelNotFoundError, UnsupportedModelError
from lmx.io import hf
from lmx.models import GGUF_ARCHITECTURES, build_model, get_architecture, text_config
from lmx.runtime import memory
from lmx.runtime.device import device_name
from lmx.tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


@dataclass
class LoadedModel:
    """A model with everything needed to run it."""

    model: nn.Module
    tokenizer: Tokenizer
    config: dict[str, Any]
    generation_config: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    name: str = ""
    quantization: dict[str, int] | None = None
    cpu_kernels: bool = False  # some weights run as GGUF blocks on lmx's CPU kernels (lmx.kernels)


def resolve_dtype(dtype: str | None) -> mx.Dtype:
    """``"auto"`` picks float32 on the CPU (MLX's fastest CPU path, measured) and bfloat16 on a GPU.

    Raises:
        InvalidOptionError: an unknown dtype name.
    """
    name = dtype or "auto"
    if name == "auto":
        name = "float32" if device_name() == "cpu" else "bfloat16"
    if name not in DTYPES:
        raise InvalidOptionError(f"dtype must be one of auto, {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[name]


def load_path(path: str | os.PathLike, *, dtype: str | None = "auto", cpu_kernels: bool | None = None) -> LoadedModel:
    """Load a model from an HF directory or a ``.gguf`` file.

    Args:
        path: the model.
        dtype: see :func:`resolve_dtype`.
        cpu_kernels: keep a GGUF model's quantized matrices as they are and run them on lmx's CPU
            kernels (:mod:`lmx.kernels`), and run every model's RMSNorms, RoPE and decode attention
            as one kernel op each. None (default): on the CPU when the kernels are built and
            ``LMX_CPU_KERNELS`` is not 0; False: MLX's own ops only; True: required.
            ``LMX_CPU_INT8=1`` (opt-in) quantizes the activations of one-token products to int8, as
            llama.cpp does: faster decoding, logits no longer those of the dequantized model.

    Raises:
        ModelNotFoundError: nothing loadable at ``path``.
        InvalidOptionError: ``cpu_kernels=True`` where the kernels cannot run.
        UnsupportedModelError, ConfigError, WeightsError, TokenizerError: as named.
    """
    mx_dtype = resolve_dtype(dtype)
    kernel_types = kernel_types_for(cpu_kernels)
    target = Path(path).expanduser()
    if target.is_dir():
        return _load_hf_dir(target, mx_dtype, layer_ops=bool(kernel_types))
    if target.is_file() and target.suffix.lower() == ".gguf":
        return _load_gguf(target, mx_dtype, kernel_types)
    if target.is_file():
        raise ModelNotFoundError(f"{target} is a file but not a .gguf; give an HF model directory or a .gguf file")
    raise ModelNotFoundError(f"model {str(path)!r} not found: no such directory or .gguf file")


def _load_hf_dir(model_dir: Path, dtype: mx.Dtype, layer_ops: bool = False) -> LoadedModel:
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ModelNotFoundError(f"{model_dir} has no config.json; is it a Hugging Face model directory?")
    config = hf.read_json(config_path)
    _check_config_shape(config, config_path)
    generation_config = hf.read_json(model_dir / "generation_config.json", required=False)
    model = _build(config, str(config_path))
    files = hf.weight_files(model_dir)
    memory.check_allocation(hf.safetensors_nbytes(files, dtype), f"loading the weights of {model_dir}")
    weights = model.sanitize(hf.read_safetensors(files))
    quant = hf.quantization_of(config, str(config_path))
    if quant:
        hf.quantize_like(model, weights, quant)
    hf.apply_weights(model, weights, str(model_dir), dtype)
    if layer_ops:
        _use_cpu_layer_ops(model)
    tokenizer = load_tokenizer(model_dir, config=text_config(config), generation_config=generation_config)
    mx.eval(model.parameters())
    return LoadedModel(model, tokenizer, text_config(config), generation_config, str(model_dir), model_dir.name, quant)


def _build(config: dict[str, Any], source: str) -> nn.Module:
    """:func:`build_model`, with the config's file named in every config error."""
    try:
        return build_model(config, source)
    except (ConfigError, UnsupportedModelError) as e:
        if source in str(e):
            raise
        raise type(e)(f"{source}: {e}") from e


def _check_config_shape(config: dict[str, Any], path: Path) -> None:
    """The keys that pick the architecture must have the right JSON type before anything uses them."""
    if "model_type" not in config:
        raise ConfigError(f"{path} is missing the required key 'model_type' (the architecture)")
    model_type = config["model_type"]
    if not isinstance(model_type, str):
        raise ConfigError(f"{path}: 'model_type' must be a string naming the architecture, got {model_type!r:.80}")
    text = config.get("text_config")
    if text is not None and not isinstance(text, dict):
        raise ConfigError(f"{path}: 'text_config' must be a JSON object, got {text!r:.80}")


def kernel_types_for(cpu_kernels: bool | None) -> frozenset[int]:
    """The GGML types to keep as blocks: those the CPU kernels read, when they are to be used.

    Args:
        cpu_kernels: as :func:`load_path` takes it.

    Raises:
        InvalidOptionError: ``cpu_kernels=True`` where the kernels cannot run.
    """
    if cpu_kernels is False:
        return frozenset()
    from lmx.kernels import GGML_TYPES, enabled_by_env, load_module

    if device_name() != "cpu":
        if cpu_kernels:
            raise InvalidOptionError("cpu_kernels=True needs the CPU device; on a GPU lmx runs MLX's own kernels")
        return frozenset()
    if cpu_kernels is None and not enabled_by_env():
        return frozenset()
    module, reason = load_module()
    if module is None:
        if cpu_kernels:
            raise InvalidOptionError(f"cpu_kernels=True, but lmx's CPU kernels are unavailable: {reason}")
        logger.info("CPU kernels unavailable (%s); using MLX's float32 path", reason)
        return frozenset()
    return frozenset(GGML_TYPES.values())


def _use_cpu_layer_ops(model: nn.Module) -> None:
    """Norms, RoPE and decode attention as one op each on the CPU kernels (:func:`lmx.models.base.use_cpu_ops`)."""
    from lmx.kernels import load_module
    from lmx.models.base import use_cpu_ops

    use_cpu_ops(model, load_module()[0])


def _load_gguf(path: Path, dtype: mx.Dtype, kernel_types: frozenset[int] = frozenset()) -> LoadedModel:
    from lmx.io.gguf import read_gguf
    from lmx.kernels import int8_by_env
    from lmx.models.gguf_layers import use_gguf_blocks
    from lmx.tokenizer.gguf import tokenizer_from_gguf

    gguf = read_gguf(path, GGUF_ARCHITECTURES, dtype=dtype, keep_blocks=kernel_types)
    model = _build(gguf.config, str(path))
    weights = model.sanitize(gguf.weights)
    blocks = {name: t for name, t in gguf.block_types.items() if name in weights}
    use_gguf_blocks(model, blocks, dtype, str(path), int8_activations=bool(blocks) and int8_by_env())
    if kernel_types:
        _use_cpu_layer_ops(model)
    if blocks:
        logger.info("%s: %d matrices run as GGUF blocks on lmx's CPU kernels", path, len(blocks))
    hf.apply_weights(model, weights, str(path), dtype)
    arch = get_architecture(gguf.config, str(path))
    # the vocabulary is GGUF metadata (io/ leaves it as such); the architecture fills in what files omit
    spec = tokenizer_from_gguf(
        gguf.header, default_chat_template=arch.CHAT_TEMPLATE, extra_eos_tokens=arch.EXTRA_EOS_TOKENS
    )
    tokenizer = Tokenizer(
        spec.backend,
        bos_token=spec.bos_token,
        eos_tokens=spec.eos_tokens,
        pad_token=spec.pad_token,
        add_bos_token=spec.add_bos_token,
        chat_template=spec.chat_template,
        name=path.name,
    )
    mx.eval(model.parameters())
    return LoadedModel(model, tokenizer, gguf.config, {}, str(path), path.stem, cpu_kernels=bool(blocks))

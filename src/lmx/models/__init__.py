"""Model architectures, one module per HF ``model_type``, listed explicitly below.

Each module exports ``ModelArgs`` and ``Model`` (the forward pass), and what the loading side reads:
``GGUF`` (its GGUF tensor names and metadata quirks, an :class:`lmx.io.gguf.GGUFArchitecture`),
``HF_ARCHITECTURE``, ``CHAT_TEMPLATE`` and ``EXTRA_EOS_TOKENS`` (for GGUF files without them),
``NEUTRAL_NORM_WEIGHT`` and ``BENCH_CONFIGS`` (for ``lmx bench``). Adding an architecture is its file
plus its entry in :data:`ARCHITECTURES`.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from lmx.errors import UnsupportedModelError
from lmx.io.gguf import GGUFArchitecture
from lmx.models import gemma3, gemma3_text, qwen3, qwen3_moe

# model_type -> module exporting ModelArgs and Model. "gemma3" is the multimodal checkpoint
# (vision tower and projector beside gemma3_text's text model).
ARCHITECTURES: dict[str, ModuleType] = {
    "gemma3_text": gemma3_text,
    "gemma3": gemma3,
    "qwen3": qwen3,
    "qwen3_moe": qwen3_moe,
}
# GGUF general.architecture -> its module, and the declarations lmx.io.gguf reads files with. A GGUF
# file holds a text model only (a multimodal module reads its GGUF through its text module).
GGUF_MODULES: dict[str, ModuleType] = {
    module.GGUF.name: module for name, module in ARCHITECTURES.items() if module.GGUF.model_type == name
}
GGUF_ARCHITECTURES: dict[str, GGUFArchitecture] = {name: module.GGUF for name, module in GGUF_MODULES.items()}
# llama.cpp mmproj files (a vision tower beside a text GGUF): clip.projector_type -> the module reading it.
MMPROJ_MODULES: dict[str, ModuleType] = {gemma3.MMPROJ_TYPE: gemma3}
# `lmx bench --config NAME` shapes of every architecture.
BENCH_CONFIGS: dict[str, dict[str, Any]] = {
    name: config for module in GGUF_MODULES.values() for name, config in module.BENCH_CONFIGS.items()
}


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """Return the text-model config (a multimodal Gemma 3 config yields its text part)."""
    model_type = config.get("model_type")
    if model_type == "gemma3":
        return gemma3_text.from_config(config)
    return config


def get_architecture(config: dict[str, Any], source: str = "config.json") -> ModuleType:
    """Return the module for ``config['model_type']``.

    Raises:
        UnsupportedModelError: the model_type is missing or not supported.
    """
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"{source}: model_type {model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type]


def build_model(config: dict[str, Any], source: str = "config.json") -> Any:
    """Build an uninitialised model (random weights) from an HF config dict."""
    if config.get("model_type") == "gemma3":
        config = gemma3.from_config(config)
    arch = get_architecture(config, source)
    args = arch.ModelArgs.from_dict(config, source)
    return arch.Model(args)

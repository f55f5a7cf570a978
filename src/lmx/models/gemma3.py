"""Gemma 3 with images: transformers' ``Gemma3ForConditionalGeneration`` semantics on MLX.

The text half is :mod:`lmx.models.gemma3_text`; this file adds the SigLIP vision tower
(``SiglipVisionModel`` without its pooling head), the multimodal projector (average pooling of the
patch grid to ``mm_tokens_per_image`` soft tokens, Gemma's RMSNorm, a projection to the text
width) and the prompt's image blocks (:mod:`lmx.models.image_prompt`): soft tokens replace the
token embeddings at the image positions and attend to their whole block.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from lmx.errors import ConfigError
from lmx.models import gemma3_text
from lmx.models.base import BaseModelArgs, Linear
from lmx.models.image_prompt import BlockMaskCache, ImagePrompt

# What the loading side reads: the text half's (a GGUF file holds the text model only).
GGUF = gemma3_text.GGUF
CHAT_TEMPLATE = gemma3_text.CHAT_TEMPLATE
EXTRA_EOS_TOKENS = gemma3_text.EXTRA_EOS_TOKENS
NEUTRAL_NORM_WEIGHT = gemma3_text.NEUTRAL_NORM_WEIGHT
HF_ARCHITECTURE = "Gemma3ForConditionalGeneration"
BENCH_CONFIGS: dict[str, dict[str, Any]] = {}
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.")  # parameters a GGUF text file does not hold


@dataclasses.dataclass
class VisionArgs(BaseModelArgs):
    """``vision_config`` (transformers' ``SiglipVisionConfig``; defaults are Gemma 3's published values)."""

    model_type: str = "siglip_vision_model"
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 896
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    vision_use_head: bool = False

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"vision_config: hidden_size {self.hidden_size} must be a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"vision_config: image_size {self.image_size} must be a multiple of patch_size {self.patch_size}"
            )
        if self.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
            raise ConfigError(f"vision_config: hidden_act {self.hidden_act!r}; allowed: gelu_pytorch_tanh, gelu")
        if self.vision_use_head:
            raise ConfigError("vision_config: vision_use_head=true is not supported (Gemma 3 uses no pooling head)")


@dataclasses.dataclass
class ModelArgs(gemma3_text.ModelArgs):
    """The text config's keys (``text_config``, flattened) plus the multimodal ones."""

    model_type: str = "gemma3"
    vision_config: dict | None = None
    mm_tokens_per_image: int = 256
    boi_token_index: int = 255_999
    eoi_token_index: int = 256_000
    image_token_index: int = 262_144

    def __post_init__(self) -> None:
        super().__post_init__()
        self.vision = VisionArgs.from_dict(self.vision_config or {}, "config.json vision_config")
        side = math.isqrt(self.mm_tokens_per_image)
        patches = self.vision.image_size // self.vision.patch_size
        if side * side != self.mm_tokens_per_image or side == 0 or patches % side:
            raise ConfigError(
                f"mm_tokens_per_image {self.mm_tokens_per_image} must be a square whose side divides the "
                f"{patches} x {patches} patch grid"
            )


def from_config(config: dict[str, Any]) -> dict[str, Any]:
    """The text config with the multimodal keys beside it (what :class:`ModelArgs` reads)."""
    flat = gemma3_text.from_config(config)
    flat["model_type"] = "gemma3"
    for key in ("vision_config", "mm_tokens_per_image", "boi_token_index", "eoi_token_index", "image_token_index"):
        if key in config:
            flat[key] = config[key]
    # transformers' attribute names for the same three ids
    for old, new in (("boi_token_id", "boi_token_index"), ("eoi_token_id", "eoi_token_index")):
        if old in config and new not in flat:
            flat[new] = config[old]
    if "image_token_id" in config and "image_token_index" not in flat:
        flat["image_token_index"] = config["image_token_id"]
    return flat


def _gelu(name: str) -> Callable[[mx.array], mx.array]:
    return nn.gelu_approx if name == "gelu_pytorch_tanh" else nn.gelu


class VisionAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.scale = (dim // n_heads) ** -0.5
        self.q_proj = Linear(dim, dim)
        self.k_proj = Linear(dim, dim)
        self.v_proj = Linear(dim, dim)
        self.out_proj = Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        batch, length, _ = x.shape

        def heads(y: mx.array) -> mx.array:
            return y.reshape(batch, length, self.n_heads, -1).transpose(0, 2, 1, 3)  # (B, n_heads, L, head_dim)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)  # every patch sees every patch
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))  # (B, L, dim)


class VisionMLP(nn.Module):
    def __init__(self, args: VisionArgs) -> None:
        super().__init__()
        self.fc1 = Linear(args.hidden_size, args.intermediate_size)
        self.fc2 = Linear(args.intermediate_size, args.hidden_size)
        self.act = _gelu(args.hidden_act)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, args: VisionArgs) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.self_attn = VisionAttention(args.hidden_size, args.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.mlp = VisionMLP(args)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class PatchEmbedding(nn.Module):
    """SigLIP's patch convolution (kernel = stride = patch) as one matmul over flattened patches;
    the weight keeps transformers' (out, channels, patch, patch) layout."""

    def __init__(self, args: VisionArgs) -> None:
        super().__init__()
        p, c = args.patch_size, args.num_channels
        self.patch = p
        self.weight = mx.zeros((args.hidden_size, c, p, p))
        self.bias = mx.zeros((args.hidden_size,))

    def __call__(self, pixels: mx.array) -> mx.array:
        n, c, height, width = pixels.shape
        p = self.patch
        gh, gw = height // p, width // p
        x = pixels.reshape(n, c, gh, p, gw, p).transpose(0, 2, 4, 1, 3, 5)  # (N, gh, gw, C, p, p)
        x = x.reshape(n, gh * gw, c * p * p)  # (N, patches, C*p*p), patches row by row
        w = self.weight.reshape(self.weight.shape[0], -1)  # (dim, C*p*p)
        return mx.addmm(self.bias, x, w.T)  # (N, patches, dim)


class VisionEmbeddings(nn.Module):
    def __init__(self, args: VisionArgs) -> None:
        super().__init__()
        self.patch_embedding = PatchEmbedding(args)
        self.position_embedding = nn.Embedding((args.image_size // args.patch_size) ** 2, args.hidden_size)

    def __call__(self, pixels: mx.array) -> mx.array:
        return self.patch_embedding(pixels) + self.position_embedding.weight  # (N, patches, dim)


class VisionEncoder(nn.Module):
    def __init__(self, args: VisionArgs) -> None:
        super().__init__()
        self.layers = [VisionLayer(args) for _ in range(args.num_hidden_layers)]


class VisionTower(nn.Module):
    """SigLIP's vision transformer without a pooling head: (N, 3, H, W) -> (N, patches, dim)."""

    def __init__(self, args: VisionArgs) -> None:
        super().__init__()
        self.embeddings = VisionEmbeddings(args)
        self.encoder = VisionEncoder(args)
        self.post_layernorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)

    def __call__(self, pixels: mx.array) -> mx.array:
        h = self.embeddings(pixels)
        for layer in self.encoder.layers:
            h = layer(h)
        return self.post_layernorm(h)


class Projector(nn.Module):
    """Patch grid -> ``mm_tokens_per_image`` soft tokens in the text model's width."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        v = args.vision
        self.grid = v.image_size // v.patch_size
        self.side = math.isqrt(args.mm_tokens_per_image)
        self.mm_input_projection_weight = mx.zeros((v.hidden_size, args.hidden_size))
        self.mm_soft_emb_norm = gemma3_text.RMSNorm(v.hidden_size, v.layer_norm_eps)

    def __call__(self, patches: mx.array) -> mx.array:
        n, _, dim = patches.shape
        k = self.grid // self.side
        x = patches.reshape(n, self.side, k, self.side, k, dim)  # (N, rows, k, cols, k, dim)
        x = x.mean(axis=(2, 4)).reshape(n, self.side * self.side, dim)  # average pool, row by row
        return self.mm_soft_emb_norm(x) @ self.mm_input_projection_weight  # (N, tokens, text dim)


class Model(gemma3_text.Model):
    """Gemma 3 with its vision tower. Text-only prompts run exactly as :class:`gemma3_text.Model`;
    a prompt with images runs :meth:`hidden_images` for the chunks that hold image positions."""

    vision_prefixes = VISION_PREFIXES  # what a GGUF text file leaves out (llama.cpp: the mmproj file)

    def __init__(self, args: ModelArgs) -> None:
        super().__init__(args)
        self.vision_tower = VisionTower(args.vision)
        self.multi_modal_projector = Projector(args)

    @property
    def image_size(self) -> int:
        return self.args.vision.image_size

    @property
    def image_tokens(self) -> int:
        """Soft tokens per image (or per crop)."""
        return self.args.mm_tokens_per_image

    def encode_images(self, pixels: mx.array) -> mx.array:
        """Soft tokens (N, mm_tokens_per_image, hidden_size) of preprocessed images (N, 3, H, W)."""
        dtype = self.multi_modal_projector.mm_input_projection_weight.dtype
        return self.multi_modal_projector(self.vision_tower(pixels.astype(dtype)))

    def hidden_images(
        self,
        inputs: mx.array,
        cache: Sequence[Any],
        images: ImagePrompt,
        each_layer: Callable[[mx.array], Any] | None = None,
    ) -> mx.array:
        """Final-norm hidden states (1, L, hidden_size) of one prompt chunk ``inputs`` (1, L) that
        may hold image positions: their inputs are the images' soft tokens, and each image block
        attends to itself bidirectionally."""
        start = cache[0].offset
        length = inputs.shape[1]
        # a placeholder id outside the vocabulary is looked up as 0 (its embedding is replaced)
        ids = mx.where(inputs >= self.args.vocab_size, 0, inputs)
        h = images.embed(self.model.embed(ids), start)
        if images.touches(start, length):
            cache = [BlockMaskCache(c, images.blocks()) for c in cache]
        for layer, layer_cache in zip(self.layers, cache):
            h = layer(h, layer_cache, None)
            if each_layer is not None:
                each_layer(h)
        return self.model.norm(h)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map HF names (transformers 4 and 5 layouts) to this module's names."""
        vision, text = {}, {}
        for name, w in weights.items():
            if name.startswith("model.") and name[6:].startswith(("vision_tower.", "multi_modal_projector.")):
                name = name[6:]
            if name.startswith("vision_tower."):
                name = "vision_tower." + name[len("vision_tower.") :].removeprefix("vision_model.")
                vision[name] = w
            elif name.startswith("multi_modal_projector."):
                vision[name] = w
            else:
                text[name] = w
        return {**super().sanitize(text), **vision}


# ---------------------------------------------------------------------------------------------------------------
# llama.cpp's mmproj GGUF file (the vision tower beside a text GGUF): general.architecture "clip",
# clip.projector_type "gemma3", tensors v.* and mm.* (the names of gguf-py's MODEL_ARCH.MMPROJ).

MMPROJ_TYPE = "gemma3"
IMAGE_TOKENS = ("<start_of_image>", "<end_of_image>", "<image_soft_token>")
_MMPROJ_LAYER = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_out": "self_attn.out_proj",
    "ln1": "layer_norm1",
    "ln2": "layer_norm2",
    "ffn_up": "mlp.fc1",
    "ffn_down": "mlp.fc2",
}
_MMPROJ_GLOBAL = {
    "v.patch_embd": "vision_tower.embeddings.patch_embedding",
    "v.position_embd": "vision_tower.embeddings.position_embedding",
    "v.post_ln": "vision_tower.post_layernorm",
    "mm.input_projection": "multi_modal_projector.mm_input_projection_weight",
    "mm.soft_emb_norm": "multi_modal_projector.mm_soft_emb_norm",
}


def mmproj_config(
    text_config: dict[str, Any], md: dict[str, Any], token_id: Callable[[str], int | None], source: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The multimodal config (the text GGUF's config plus the mmproj file's vision keys and the
    vocabulary's image tokens) and a ``preprocessor_config.json`` equivalent.

    Raises:
        ConfigError: a key the vision tower needs is missing, or the vocabulary lacks an image token.
    """

    def key(name: str, default: Any = None) -> Any:
        value = md.get(f"clip.vision.{name}", default)
        if value is None:
            raise ConfigError(f"{source}: the mmproj file lacks clip.vision.{name}")
        return value

    image_size, patch = int(key("image_size")), int(key("patch_size"))
    vision = {
        "hidden_size": int(key("embedding_length")),
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": int(key("attention.head_count")),
        "layer_norm_eps": float(key("attention.layer_norm_epsilon", 1e-6)),
        "image_size": image_size,
        "patch_size": patch,
    }
    scale = int(key("projector.scale_factor", 4))  # llama.cpp writes it only when it is not 4
    side = (image_size // patch) // scale
    ids = [token_id(t) for t in IMAGE_TOKENS]
    missing = [t for t, i in zip(IMAGE_TOKENS, ids) if i is None]
    if missing:
        raise ConfigError(f"{source}: the text model's vocabulary lacks {', '.join(missing)}")
    config = {
        "model_type": "gemma3",
        "text_config": text_config,
        "vision_config": vision,
        "mm_tokens_per_image": side * side,
        "boi_token_index": ids[0],
        "eoi_token_index": ids[1],
        "image_token_index": ids[2],
    }
    preprocessor = {"size": {"height": image_size, "width": image_size}}
    for name in ("image_mean", "image_std"):
        if md.get(f"clip.vision.{name}") is not None:
            preprocessor[name] = [float(v) for v in md[f"clip.vision.{name}"]]
    return config, preprocessor


def mmproj_weights(tensors: dict[str, mx.array], source: str) -> dict[str, mx.array]:
    """This module's names for an mmproj file's tensors.

    Raises:
        WeightsError: a tensor has no counterpart here.
    """
    from lmx.errors import WeightsError

    out = {}
    for name, w in tensors.items():
        base, _, suffix = name.rpartition(".")
        parts = base.split(".")
        if base in _MMPROJ_GLOBAL:
            ours = _MMPROJ_GLOBAL[base]
        elif len(parts) == 4 and parts[:2] == ["v", "blk"] and parts[3] in _MMPROJ_LAYER:
            ours = f"vision_tower.encoder.layers.{parts[2]}.{_MMPROJ_LAYER[parts[3]]}"
        else:
            raise WeightsError(f"{source}: mmproj tensor {name!r} has no Gemma 3 vision counterpart")
        if base == "mm.soft_emb_norm":
            w = w - 1.0  # llama.cpp stores Gemma's RMSNorm weight as 1 + w
        out[ours if base == "mm.input_projection" else f"{ours}.{suffix}"] = w
    return out

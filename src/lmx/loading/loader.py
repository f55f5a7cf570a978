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
from lmx.io.image import ImageProcessor
from lmx.models import GGUF_ARCHITECTURES, build_model, get_architecture, text_config
from lmx.models.pipeline_parallel import PipelinePlan, attach, split_model
from lmx.models.tensor_parallel import ShardPlan, shard_model
from lmx.runtime import memory
from lmx.runtime.device import backend_name, device_name
from lmx.runtime.distributed import Group
from lmx.runtime.ops import Ops
from lmx.runtime.profile import AUTO_DTYPE, DeviceProfile, choose_profile, make_ops
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
    gguf_affine: dict[str, int] = field(default_factory=dict)  # layer path -> GGML type, held in MLX affine form
    profile: DeviceProfile = field(default_factory=DeviceProfile)  # chosen once, at load
    own_chat_template: bool = True  # False: a GGUF without one runs on its architecture's template
    image_processor: ImageProcessor | None = None  # a model that reads images: its preprocessing
    group: Group | None = None  # the ranks sharing the model (tensor parallel), None: this process alone
    shards: ShardPlan | PipelinePlan | None = None  # what of the model this rank holds (tensor/pipeline parallel)

    @property
    def chat_template_origin(self) -> str:
        """``"model"``, ``"architecture"`` (the model brought none: likely a base model) or ``"none"``."""
        if self.tokenizer.chat_template is None:
            return "none"
        return "model" if self.own_chat_template else "architecture"


def resolve_dtype(dtype: str | None) -> mx.Dtype:
    """``"auto"`` picks float32 on the CPU (MLX's fastest CPU path, measured) and bfloat16 on a GPU.

    Raises:
        InvalidOptionError: an unknown dtype name.
    """
    name = dtype or "auto"
    if name == "auto":
        name = AUTO_DTYPE[device_name()]
    if name not in DTYPES:
        raise InvalidOptionError(f"dtype must be one of auto, {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[name]


def load_path(
    path: str | os.PathLike,
    *,
    dtype: str | None = "auto",
    cpu_kernels: bool | None = None,
    gguf_on_device: str | None = None,
    group: Group | None = None,
) -> LoadedModel:
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
        gguf_on_device: where the CPU kernels do not run a GGUF model: ``"quantized"`` holds its
            Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K matrices as MLX affine quantized layers (the same
            values; scales in the weights' dtype), ``"float"`` dequantizes them. None:
            ``LMX_GGUF_ON_DEVICE``, whose ``auto`` is float (quantized is opt-in).
        group: split the model over these ranks (tensor parallel, :mod:`lmx.models.tensor_parallel`):
            each rank reads only its slices. Float weights only: a GGUF file is dequantized
            (``cpu_kernels`` and ``gguf_on_device="quantized"`` are refused), a quantized HF
            checkpoint is refused; every step decodes eagerly. None or a group of one: no split.
            A group whose ``split`` is ``pipeline-parallel`` splits the decoder layers instead
            (:mod:`lmx.models.pipeline_parallel`): each rank reads only its layers' tensors
            (float weights, eager steps, images not read, as above).

    Raises:
        ModelNotFoundError: nothing loadable at ``path``.
        InvalidOptionError: ``cpu_kernels=True`` where the kernels cannot run; a bad ``gguf_on_device``;
            quantized layers asked for under tensor parallel.
        UnsupportedModelError, ConfigError, WeightsError, TokenizerError: as named.
    """
    mx_dtype = resolve_dtype(dtype)
    if group is not None and group.size > 1:
        if cpu_kernels or gguf_on_device == "quantized":
            raise InvalidOptionError(
                f"{group.split.replace('-', ' ')} runs float weights only: cpu_kernels=True and gguf_on_device='quantized' "
                "are not supported with it (a GGUF file is dequantized)"
            )
        cpu_kernels, gguf_on_device = False, "float"
    else:
        group = None
    kernel_types = kernel_types_for(cpu_kernels)
    profile = load_profile(dtype, cpu_kernels=bool(kernel_types), gguf_on_device=gguf_on_device)
    if group is not None:
        # collectives run op by op, not inside compiled graphs; each rank keeps its slices as they are
        profile = profile.replace(decode_mode="eager", fused_projections=False)
    target = Path(path).expanduser()
    if target.is_dir():
        return _fused(_load_hf_dir(target, mx_dtype, profile, group))
    if target.is_file() and target.suffix.lower() == ".gguf":
        return _fused(_load_gguf(target, mx_dtype, profile, kernel_types, group))
    if target.is_file():
        raise ModelNotFoundError(f"{target} is a file but not a .gguf; give an HF model directory or a .gguf file")
    raise ModelNotFoundError(f"model {str(path)!r} not found: no such directory or .gguf file")


def _fused(loaded: LoadedModel) -> LoadedModel:
    """``loaded`` with its projections fused where its profile says so (here, where the loader
    holds no other reference to the unfused weights: their memory is freed as each layer is fused)."""
    if loaded.profile.fused_projections:
        groups = loaded.model.fuse_projections()
        logger.info("%s: %d groups of projections run as one product each", loaded.name, groups)
    return loaded


def load_profile(
    dtype: str | None = "auto", *, cpu_kernels: bool = False, gguf_on_device: str | None = None
) -> DeviceProfile:
    """The device profile of a model loaded now: MLX's default device, the weights' ``dtype``
    (a name, or ``"auto"``), whether lmx's CPU kernels run it, how GGUF matrices are held
    (``gguf_on_device``, else ``LMX_GGUF_ON_DEVICE``), and the settings.

    Raises:
        InvalidOptionError: a bad ``gguf_on_device`` or ``LMX_GGUF_ON_DEVICE``.
    """
    from lmx.kernels import cuda_attention
    from lmx.runtime import settings

    if gguf_on_device is None:
        chosen = settings.LMX_GGUF_ON_DEVICE.get()
        gguf_on_device = None if chosen == "auto" else chosen
    return choose_profile(
        device_name(),
        backend=backend_name(),
        dtype=None if (dtype or "auto") == "auto" else dtype,
        cpu_kernels=cpu_kernels,
        cuda_attention=cuda_attention.enabled_by_env(),  # LMX_CUDA_ATTENTION, read where it was
        cuda_kernels=settings.LMX_CUDA_QUANTIZED.get() or settings.LMX_CUDA_DENSE.get(),
        gguf_on_device=gguf_on_device,
        fused_projections=settings.LMX_FUSED_PROJECTIONS.get(),
        encode_thread={"auto": None, "on": True, "off": False}[settings.LMX_ENCODE_THREAD.get()],
    )


def profile_ops(profile: DeviceProfile) -> Ops:
    """The profile's ops object, for ``model.set_ops`` (with the kernels module it names)."""
    if profile.ops_backend == "cpu-kernels":
        from lmx.kernels import load_module

        return make_ops(profile, load_module()[0])
    if profile.ops_backend == "cuda-kernels":
        from lmx.kernels import cuda_attention, cuda_dense, cuda_quantized
        from lmx.runtime import settings

        return make_ops(
            profile,
            cuda=cuda_attention,
            cuda_padded=cuda_attention.padded_by_env(),
            cuda_quantized=cuda_quantized if settings.LMX_CUDA_QUANTIZED.get() else None,
            cuda_attention=cuda_attention.enabled_by_env(),
            cuda_dense=cuda_dense if settings.LMX_CUDA_DENSE.get() else None,
        )
    return make_ops(profile)


def _shard(model: nn.Module, group: Group | None) -> ShardPlan | PipelinePlan | None:
    """Split ``model`` over ``group`` (None: keep it whole), by slices or by layers as the group says."""
    if group is None:
        return None
    if group.split == "pipeline-parallel":
        return split_model(model, group)
    return shard_model(model, group)


def _finish_split(
    model: nn.Module, plan: ShardPlan | PipelinePlan | None, group: Group | None, dtype: mx.Dtype
) -> None:
    """A rank of a pipeline-parallel group runs its stage from now on (its weights are loaded)."""
    if isinstance(plan, PipelinePlan) and group is not None:
        attach(model, plan, group, dtype)


def _readers(plan: ShardPlan | PipelinePlan | None) -> dict[str, Any]:
    """How a rank reads the tensors it holds: its slices (tensor parallel) or its layers' (pipeline)."""
    if isinstance(plan, PipelinePlan):
        return {"keep": plan.keeps}
    if isinstance(plan, ShardPlan):
        return {"select": plan.take}
    return {}


def _load_hf_dir(model_dir: Path, dtype: mx.Dtype, profile: DeviceProfile, group: Group | None) -> LoadedModel:
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ModelNotFoundError(f"{model_dir} has no config.json; is it a Hugging Face model directory?")
    config = hf.read_json(config_path)
    _check_config_shape(config, config_path)
    generation_config = hf.read_json(model_dir / "generation_config.json", required=False)
    model = _build(config, str(config_path))
    quant = hf.quantization_of(config, str(config_path))
    if quant and group is not None:
        raise UnsupportedModelError(
            f"{model_dir} is quantized ({quant['bits']}-bit); {group.split.replace('-', ' ')} runs float weights only"
        )
    plan = _shard(model, group)
    files = hf.weight_files(model_dir)
    size = 1 if group is None else group.size
    memory.check_allocation(hf.safetensors_nbytes(files, dtype) // size, f"loading the weights of {model_dir}")
    if isinstance(plan, PipelinePlan):
        weights = model.sanitize(hf.read_safetensors(files, keep=plan.keeps))
    else:
        weights = model.sanitize(hf.read_safetensors(files, None if plan is None else plan.slice_of))
    if quant:
        hf.quantize_like(model, weights, quant)
    hf.apply_weights(model, weights, str(model_dir), dtype)
    _finish_split(model, plan, group, dtype)
    model.set_ops(profile_ops(profile))
    tokenizer = load_tokenizer(model_dir, config=text_config(config), generation_config=generation_config)
    mx.eval(model.parameters())
    image_processor = None
    if hasattr(model, "encode_images"):  # a model with a vision tower: preprocessor_config.json (or its defaults)
        preprocessor = hf.read_json(model_dir / "preprocessor_config.json", required=False)
        image_processor = ImageProcessor.from_config(preprocessor, model.image_size)
    return LoadedModel(
        model,
        tokenizer,
        text_config(config),
        generation_config,
        str(model_dir),
        model_dir.name,
        quant,
        profile=profile,
        image_processor=image_processor,
        group=group,
        shards=plan,
    )


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


def _load_gguf(
    path: Path, dtype: mx.Dtype, profile: DeviceProfile, kernel_types: frozenset[int], group: Group | None
) -> LoadedModel:
    from lmx.io.gguf import read_gguf
    from lmx.kernels import huge_pages_by_env, int8_by_env
    from lmx.models.gguf_layers import use_gguf_blocks, use_huge_pages
    from lmx.tokenizer.gguf import tokenizer_from_gguf

    affine = affine_widths_here(dtype) if profile.gguf_on_device == "quantized" else {}
    model, plan = None, None
    if group is None:
        gguf = read_gguf(path, GGUF_ARCHITECTURES, dtype=dtype, keep_blocks=kernel_types, affine=affine)
    else:  # the config first, to know the slices; then each tensor is dequantized and sliced in turn
        from lmx.io.gguf import gguf_config, read_header

        model = _build(gguf_config(read_header(path), GGUF_ARCHITECTURES), str(path))
        plan = _shard(model, group)
        gguf = read_gguf(path, GGUF_ARCHITECTURES, dtype=dtype, **_readers(plan))
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
    config, gguf_weights, preprocessor = gguf.config, gguf.weights, None
    projector = find_mmproj(path)
    if projector is not None and group is not None:
        logger.warning("%s: images are not read under %s; %s is not loaded", path, group.split, projector.name)
    elif projector is not None:  # llama.cpp's vision tower beside the text model
        config, vision, preprocessor = _read_mmproj(projector, gguf.config, tokenizer, dtype)
        gguf_weights = {**gguf.weights, **vision}
    if model is None:
        model = _build(config, str(path))
    weights = model.sanitize(gguf_weights)
    blocks = {name: t for name, t in gguf.block_types.items() if name in weights}
    use_gguf_blocks(model, blocks, dtype, str(path), int8_activations=bool(blocks) and int8_by_env())
    affine_layers = _use_affine(model, weights, gguf.affine_types, gguf.affine_bits)
    model.set_ops(profile_ops(profile))
    if blocks:
        logger.info("%s: %d matrices run as GGUF blocks on lmx's CPU kernels", path, len(blocks))
    if affine_layers:
        logger.info("%s: %d matrices run as MLX affine quantized layers", path, len(affine_layers))
    hf.apply_weights(model, weights, str(path), dtype)
    _finish_split(model, plan, group, dtype)
    mx.eval(model.parameters())
    if blocks and huge_pages_by_env():
        logger.debug("%s: %d bytes of GGUF blocks on huge pages", path, use_huge_pages(model))
    image_processor = None
    if preprocessor is not None and hasattr(model, "encode_images"):
        image_processor = ImageProcessor.from_config(preprocessor, model.image_size)
    return LoadedModel(
        model,
        tokenizer,
        gguf.config,
        {},
        str(path),
        path.stem,
        cpu_kernels=bool(blocks),
        gguf_affine=affine_layers,
        profile=profile,
        own_chat_template=bool(gguf.header.metadata.get("tokenizer.chat_template")),
        image_processor=image_processor,
        group=group,
        shards=plan,
    )


def find_mmproj(path: Path) -> Path | None:
    """llama.cpp's vision-tower file beside the GGUF text model ``path``: the one ``mmproj*.gguf``
    in its directory. None when there is none, or several (which one is meant cannot be told: the
    text model loads alone, with a warning)."""
    found = sorted(p for p in path.parent.glob("mmproj*.gguf") if p.is_file() and p != path)
    if len(found) > 1:
        logger.warning(
            "%s: several mmproj files beside it (%s); loading the text model only",
            path,
            ", ".join(p.name for p in found),
        )
        return None
    return found[0] if found else None


def _read_mmproj(
    path: Path, text_config: dict[str, Any], tokenizer: Tokenizer, dtype: mx.Dtype
) -> tuple[dict[str, Any], dict[str, mx.array], dict[str, Any]]:
    """The multimodal config, the vision weights (HF-side names) and the preprocessing of an mmproj file.

    Raises:
        UnsupportedModelError: its projector type is not one lmx reads.
        ConfigError, WeightsError: as the architecture's reader raises them.
    """
    from lmx.io.gguf import read_gguf_tensors
    from lmx.models import MMPROJ_MODULES

    header, tensors = read_gguf_tensors(path, dtype)
    md = header.metadata
    kind = md.get("clip.projector_type") or md.get("clip.vision.projector_type")
    module = MMPROJ_MODULES.get(kind) if isinstance(kind, str) else None
    if module is None:
        raise UnsupportedModelError(
            f"{path}: mmproj projector type {kind!r} is not supported; supported: {', '.join(sorted(MMPROJ_MODULES))}"
        )
    config, preprocessor = module.mmproj_config(text_config, md, tokenizer.token_to_id, str(path))
    return config, module.mmproj_weights(tensors, str(path)), preprocessor


def _use_affine(
    model: nn.Module, weights: dict[str, mx.array], affine_types: dict[str, int], affine_bits: dict[str, int]
) -> dict[str, int]:
    """Make the layers whose weights came in MLX's affine form quantized layers of their bits (in place).

    ``weights`` is the model's (sanitized) tensors: a quantized weight the model does not take (a tied
    head's copy) loses its scales and biases here too, so the strict load names nothing twice.

    Returns:
        Layer path -> GGML type of the layers made quantized.
    """
    from lmx.io.gguf_quants import AFFINE_GROUP_SIZE

    layers, bits = {}, {}
    for name, ggml_type in affine_types.items():
        path = name.removesuffix(".weight")
        if name in weights:
            layers[path], bits[path] = ggml_type, affine_bits[name]
        else:
            weights.pop(f"{path}.scales", None)
            weights.pop(f"{path}.biases", None)
    if layers:
        nn.quantize(
            model,
            class_predicate=lambda path, _module: (
                {"group_size": AFFINE_GROUP_SIZE, "bits": bits[path]} if path in layers else False
            ),
        )
    return layers


def affine_widths_here(dtype: mx.Dtype) -> dict[int, int]:
    """GGML type -> the packed width its matrices take on MLX's default device: the type's own
    (:data:`lmx.io.gguf_quants.AFFINE_BITS`) where ``mx.quantized_matmul`` of that width runs there
    for one token and for a prompt chunk, else 8 (the same values; more bytes).

    MLX's kernels differ per device (a CUDA build may lack odd widths for some shapes); one tiny
    product of each width, tried once per load, says which run.
    """
    from lmx.io.gguf_quants import AFFINE_BITS, AFFINE_GROUP_SIZE

    runs = {}
    for bits in sorted(set(AFFINE_BITS.values())):
        try:
            w, s, b = mx.quantize(mx.zeros((64, 256)), group_size=AFFINE_GROUP_SIZE, bits=bits)
            s, b = s.astype(dtype), b.astype(dtype)
            for rows in (1, 16):
                x = mx.zeros((rows, 256), dtype=dtype)
                mx.eval(mx.quantized_matmul(x, w, s, b, transpose=True, group_size=AFFINE_GROUP_SIZE, bits=bits))
            runs[bits] = True
        except (RuntimeError, ValueError) as e:
            logger.info(
                "MLX has no %d-bit quantized product here (%s); such GGUF matrices are packed in 8 bits", bits, e
            )
            runs[bits] = False
    return {t: bits if runs[bits] else 8 for t, bits in AFFINE_BITS.items()}

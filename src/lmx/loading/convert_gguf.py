"""Write a loaded model as a GGUF file, the way llama.cpp's ``convert_hf_to_gguf.py`` lays one out.

Tensors take llama.cpp's names (``blk.N.attn_q.weight``...; :func:`lmx.io.gguf.gguf_names`), Gemma's
norm weights are stored as ``1 + w`` (the architecture's ``norm_offset``), 1-D tensors stay F32 and
the matrices take the asked type: F32, F16, BF16 or Q8_0. The hyperparameters go under the
``<arch>.*`` keys :func:`lmx.io.gguf.gguf_config` reads back, and the tokenizer under
``tokenizer.ggml.*``, in one of the two kinds :mod:`lmx.tokenizer.gguf` rebuilds:

* ``gpt2`` (byte-level BPE: Qwen 3): tokens in the byte alphabet, their types, the merges, and the
  pre-tokenizer's name (``qwen2``, ``llama-bpe`` or ``gpt-2``, recognised from the split regex);
* ``llama`` (SentencePiece BPE with byte fallback: Gemma 3): tokens, scores (``-id``: the reader
  ranks merges by position, which is what the scores then say too) and types; runs of spaces are
  spelled with spaces, not "▁", as llama.cpp's Gemma files have them.

Token types follow llama.cpp: special added tokens are CONTROL, other added tokens USER_DEFINED,
``<0xAB>`` tokens BYTE; the vocabulary is padded with ``[PADn]`` (UNUSED) to the embedding's rows,
as llama.cpp requires.

Not written: YaRN's beta/attention-factor settings beyond type, factor and original context (lmx's
reader takes their defaults), llama3-type RoPE (refused), and MLX-quantized sources (refused: the
weights must be float).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from lmx.errors import InvalidOptionError, UnsupportedModelError
from lmx.io.gguf import GGUFArchitecture, gguf_names
from lmx.loading.loader import LoadedModel
from lmx.models.rope import rope_settings
from lmx.runtime.files import staged_file
from lmx.tokenizer import Tokenizer
from lmx.tokenizer.gguf import SPLIT_REGEXES, spm_merges

logger = logging.getLogger(__name__)

GGUF_TYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
"""``--dtype`` -> the GGML type of the matrices written."""

GGUF_Q_BITS = (8,)
"""``--q-bits`` values GGUF output takes: 8 is Q8_0 (blocks of 32 values, one F16 scale each)."""

SUPPORTED = ("gemma3", "qwen3")
"""GGUF architectures lmx writes."""

# gguf.TokenType
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")
# llama.cpp's names for the split regexes lmx knows (SPLIT_REGEXES has aliases; these are canonical)
_PRE_NAMES = {SPLIT_REGEXES["qwen2"]: "qwen2", SPLIT_REGEXES["llama-bpe"]: "llama-bpe"}


def write_gguf(
    loaded: LoadedModel,
    spec: GGUFArchitecture,
    out: Path,
    *,
    dtype: str = "float32",
    q_bits: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Write ``loaded`` (float weights) as the GGUF file ``out``, atomically.

    Args:
        loaded: the model, loaded with float weights.
        spec: its GGUF architecture (``lmx.models.GGUF_ARCHITECTURES[...]``).
        out: the file to write.
        dtype: float32, float16 or bfloat16: the type of the matrices (1-D tensors stay F32).
        q_bits: 8 to store the matrices as Q8_0, else None.
        progress: called as ``progress(done, total)`` while tensors are prepared.

    Raises:
        InvalidOptionError: a dtype or bit width GGUF output does not take.
        UnsupportedModelError: an architecture, RoPE type or tokenizer GGUF cannot describe.
        SaveError: ``out`` could not be written; it is unchanged.
    """
    import gguf

    if dtype not in GGUF_TYPES:
        raise InvalidOptionError(f"GGUF output dtype must be one of {', '.join(GGUF_TYPES)}, got {dtype!r}")
    if q_bits is not None and q_bits not in GGUF_Q_BITS:
        raise InvalidOptionError(
            f"GGUF output quantizes to Q8_0 only (--q-bits 8); got q_bits={q_bits!r}. "
            "For 4-bit weights convert to a directory (MLX affine)"
        )
    if spec.name not in SUPPORTED or spec.permuted_qk:
        raise UnsupportedModelError(
            f"writing GGUF is supported for {', '.join(SUPPORTED)}; this model is {spec.name!r}"
        )
    args = loaded.model.args
    matrix_type = gguf.GGMLQuantizationType["Q8_0" if q_bits else GGUF_TYPES[dtype]]
    tensors = _tensors(loaded, spec, args.num_hidden_layers, matrix_type, progress)
    vocab_rows = int(args.vocab_size)
    with staged_file(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), spec.name)
        writer.add_name(loaded.name or Path(loaded.source).name or spec.name)
        writer.add_file_type(_file_type(matrix_type))
        if q_bits:
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_hparams(writer, spec.name, args)
        # a template the architecture supplied (a GGUF file without one) is not the model's own
        template = loaded.tokenizer.chat_template if loaded.own_chat_template else None
        _add_tokenizer(writer, loaded.tokenizer, spec.name, vocab_rows, template)
        for name, (data, raw) in tensors.items():
            writer.add_tensor(name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def _file_type(matrix_type: Any) -> int:
    import gguf

    names = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0"}
    return int(gguf.LlamaFileType[names[matrix_type.name]])


def _tensors(
    loaded: LoadedModel,
    spec: GGUFArchitecture,
    n_layers: int,
    matrix_type: Any,
    progress: Callable[[int, int], None] | None,
) -> dict[str, tuple[np.ndarray, Any]]:
    """GGUF name -> (array or block bytes, GGML type) for every parameter of the model."""
    import gguf

    names = gguf_names(spec, n_layers)
    params = dict(tree_flatten(loaded.model.parameters()))
    # a GGUF file holds the text model; llama.cpp keeps a vision tower in a separate mmproj file
    vision = tuple(getattr(loaded.model, "vision_prefixes", ()))
    if vision:
        params = {k: v for k, v in params.items() if not k.startswith(vision)}
        logger.info("%s: the vision tower is not written (a GGUF file holds the text model)", loaded.source)
    unknown = sorted(set(params) - set(names))
    if unknown:
        raise UnsupportedModelError(
            f"{loaded.source}: tensors {', '.join(unknown[:5])} have no {spec.name} GGUF name; "
            "only float (non-quantized) Gemma 3 / Qwen 3 weights can be written as GGUF"
        )
    out: dict[str, tuple[np.ndarray, Any]] = {}
    for i, (hf, w) in enumerate(params.items()):
        name = names[hf]
        w = w.astype(mx.float32)
        if spec.norm_offset and name.endswith("norm.weight"):
            w = w + spec.norm_offset
        target = matrix_type if w.ndim == 2 else gguf.GGMLQuantizationType.F32
        if target.name == "Q8_0" and w.shape[-1] % 32:
            target = gguf.GGMLQuantizationType.F16  # llama.cpp's fallback for rows Q8_0 blocks do not tile
        out[name] = (_encode(w, target), target)
        if progress:
            progress(i + 1, len(params))
    return out


def _encode(w: mx.array, target: Any) -> np.ndarray:
    import gguf

    if target.name == "F32":
        return np.array(w)
    if target.name == "F16":
        return np.array(w.astype(mx.float16))
    if target.name == "BF16":
        return np.array(w.astype(mx.bfloat16).view(mx.uint16)).view(np.uint8)
    return gguf.quants.quantize(np.array(w), target)


# --------------------------------------------------------------------------------------- hyperparameters


def _add_hparams(writer: Any, arch: str, args: Any) -> None:
    def put(key: str, value: Any) -> None:
        if isinstance(value, bool):
            writer.add_bool(f"{arch}.{key}", value)
        elif isinstance(value, int):
            writer.add_uint32(f"{arch}.{key}", value)
        else:
            writer.add_float32(f"{arch}.{key}", float(value))

    put("context_length", int(args.max_position_embeddings))
    put("embedding_length", int(args.hidden_size))
    put("block_count", int(args.num_hidden_layers))
    put("feed_forward_length", int(args.intermediate_size))
    put("attention.head_count", int(args.num_attention_heads))
    put("attention.head_count_kv", int(args.num_key_value_heads))
    put("attention.key_length", int(args.head_dim))
    put("attention.value_length", int(args.head_dim))
    put("attention.layer_norm_rms_epsilon", float(args.rms_norm_eps))
    layer_types = list(getattr(args, "layer_types", None) or ["full_attention"] * args.num_hidden_layers)
    full = "full_attention" if "full_attention" in layer_types else layer_types[0]
    rope = rope_settings(args.rope_parameters, args.rope_scaling, args.rope_theta, full)
    put("rope.freq_base", float(rope["rope_theta"]))
    _add_rope_scaling(writer, arch, rope)
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if getattr(args, key, None) is not None:
            put(key, float(getattr(args, key)))
    if arch == "gemma3":
        sliding = [t == "sliding_attention" for t in layer_types]
        put("attention.sliding_window", int(args.sliding_window))
        writer.add_array(f"{arch}.attention.sliding_window_pattern", sliding)
        local = rope_settings(args.rope_parameters, None, args.rope_local_base_freq, "sliding_attention")
        put("rope.freq_base_swa", float(local["rope_theta"]))
        if float(args.query_pre_attn_scalar) != float(args.head_dim):
            put("attention.scale", float(args.query_pre_attn_scalar) ** -0.5)


def _add_rope_scaling(writer: Any, arch: str, rope: dict[str, Any]) -> None:
    kind = rope["rope_type"]
    if kind == "default":
        return
    if kind not in ("linear", "yarn"):
        raise UnsupportedModelError(f"rope_type {kind!r} cannot be written to GGUF; supported: default, linear, yarn")
    factor = rope.get("factor")
    if not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor <= 0:
        raise UnsupportedModelError(f"rope scaling {kind!r} needs a positive factor, got {factor!r}")
    writer.add_string(f"{arch}.rope.scaling.type", kind)
    writer.add_float32(f"{arch}.rope.scaling.factor", float(factor))
    if rope.get("original_max_position_embeddings") is not None:
        writer.add_uint32(f"{arch}.rope.scaling.original_context_length", int(rope["original_max_position_embeddings"]))


# --------------------------------------------------------------------------------------------- tokenizer


def _add_tokenizer(writer: Any, tokenizer: Tokenizer, arch: str, rows: int, template: str | None) -> None:
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise UnsupportedModelError(
            f"tokenizer model {model.get('type')!r} cannot be written to GGUF; supported: BPE "
            "(byte-level, as Qwen 3; or SentencePiece-style with byte fallback, as Gemma 3)"
        )
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    added = {t["id"]: t for t in spec.get("added_tokens") or []}
    for i, t in added.items():
        vocab.setdefault(t["content"], i)
    size = max([rows, *(i + 1 for i in vocab.values())])
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [UNUSED] * size
    for token, i in vocab.items():
        tokens[i] = token
        types[i] = UNUSED if token == f"[PAD{i}]" else NORMAL  # the padding of a GGUF source, too
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    if model.get("byte_fallback"):
        kind = "llama"
        for i, token in enumerate(tokens):
            if types[i] == NORMAL and _BYTE_TOKEN.fullmatch(token):
                types[i] = BYTE
        _check_spm(tokens, vocab, merges, arch)
        # llama.cpp stores runs of two or more spaces as spaces (readers respell them as "▁")
        # (and type them USER_DEFINED, as llama.cpp does)
        for i, token in enumerate(tokens):
            if len(token) > 1 and set(token) == {"▁"}:
                tokens[i] = token.replace("▁", " ")
                types[i] = USER_DEFINED if types[i] == NORMAL else types[i]
    else:
        kind = "gpt2"
    unk = model.get("unk_token")
    if unk in vocab:
        types[vocab[unk]] = UNKNOWN
    for i, t in added.items():
        types[i] = CONTROL if t.get("special") else USER_DEFINED
    writer.add_tokenizer_model(kind)
    writer.add_tokenizer_pre(_pre_name(spec) if kind == "gpt2" else "default")
    if kind == "llama":
        writer.add_add_space_prefix(not arch.startswith("gemma"))  # Gemma prepends no space
    writer.add_token_list(tokens)
    if kind == "llama":
        writer.add_token_scores([-float(i) for i in range(size)])
    writer.add_token_types(types)
    if kind == "gpt2":
        writer.add_token_merges(merges)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    eos = [tokenizer.token_to_id(tokenizer.eos_token)] if tokenizer.eos_token else []
    eos = [i for i in eos if i is not None]
    others = sorted(tokenizer.eos_token_ids - set(eos))
    if eos or others:
        writer.add_eos_token_id(eos[0] if eos else others.pop(0))
    if others:
        writer.add_eot_token_id(others[0])
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    if unk in vocab:
        writer.add_unk_token_id(vocab[unk])
    writer.add_add_bos_token(bool(tokenizer.add_bos_token))
    writer.add_add_eos_token(False)
    if template:
        writer.add_chat_template(template)


def _pre_name(spec: dict[str, Any]) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level tokenizer.json's pre-tokenizer."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Split", "ByteLevel"]:
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex in _PRE_NAMES:
            return _PRE_NAMES[regex]
    raise UnsupportedModelError(
        f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:200]}) has no GGUF name; supported: GPT-2's "
        "byte-level regex, and the Qwen 2 / Llama 3 split regexes"
    )


def _check_spm(tokens: list[str], vocab: dict[str, int], merges: list[str], arch: str) -> None:
    """Warn when the merges a GGUF reader recovers from the vocabulary do not rank as the source's."""
    if not merges:
        return
    recovered = spm_merges(tokens, vocab, None if arch.startswith("gemma") else [-float(i) for i in range(len(tokens))])
    rank = {f"{a} {b}": i for i, (a, b) in enumerate(recovered)}
    order = [rank.get(m, -1) for m in merges]
    if -1 in order or order != sorted(order):
        logger.warning(
            "the tokenizer's merges do not follow its vocabulary order; a GGUF reader may tokenize some text differently"
        )


__all__ = ["GGUF_Q_BITS", "GGUF_TYPES", "SUPPORTED", "write_gguf"]

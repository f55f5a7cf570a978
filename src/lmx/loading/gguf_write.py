"""Write a GGUF file: a GGUF model with some of its matrices replaced (a fused LoRA adapter).

Every tensor that is not replaced keeps its blocks byte for byte, and every metadata key
(vocabulary, chat template, hyperparameters) is copied, so the new file runs exactly as its
source except where the adapter changed it. A replaced matrix keeps a float type (F32, F16,
BF16) and is otherwise written as Q8_0 (8.5 bits per weight), whatever its source type:

* the ``gguf`` package cannot write the K-quants or the i-quants (Q4_K_M files are mostly those);
* re-quantizing a merged matrix onto a 4- or 5-bit grid would snap most of an adapter's small
  change back onto the base's values, so Q4_0/Q5_0 sources become Q8_0 too.

Q8_0 is the closest type the package writes and one lmx's CPU kernels run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import mlx.core as mx
import numpy as np

from lmx.errors import InvalidOptionError
from lmx.io.gguf import GGUFArchitecture, architecture_of, hf_name, read_header
from lmx.runtime.files import staged_file

KEPT = ("F32", "F16", "BF16")
"""GGML types a replaced matrix keeps; from any other it becomes :data:`QUANTIZED`."""

QUANTIZED = "Q8_0"


def write_replaced(
    source: str | os.PathLike,
    out: str | os.PathLike,
    replaced: Mapping[str, mx.array],
    architectures: Mapping[str, GGUFArchitecture],
) -> dict[str, tuple[str, str]]:
    """Copy the GGUF file ``source`` to ``out`` with the matrices in ``replaced`` rewritten.

    Args:
        source: the GGUF file the model was loaded from.
        out: the file to write (atomically: a failure leaves no partial file).
        replaced: HF tensor name -> its new float weights, in HF layout.
        architectures: the readable architectures (``lmx.models.GGUF_ARCHITECTURES``).

    Returns:
        GGUF tensor name -> (type in the source, type written) for every replaced matrix.

    Raises:
        InvalidOptionError: a replaced name has no tensor of that shape in ``source``, or is a
            tensor whose GGUF layout differs from HF's (llama's permuted Q/K).
        SaveError: ``out`` could not be written; it is unchanged.
    """
    import gguf

    header = read_header(source)
    spec = architecture_of(header, architectures)
    reader = gguf.GGUFReader(str(header.path))
    by_hf = {hf_name(t.name, spec): t for t in reader.tensors}
    missing = sorted(set(replaced) - set(by_hf))
    if missing:
        raise InvalidOptionError(f"{header.path} has no tensor for {', '.join(missing)}")
    written: dict[str, tuple[str, str]] = {}
    with staged_file(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), spec.name)
        for field in reader.fields.values():
            # the writer sets the architecture itself; GGUF.* are the reader's view of the header
            if field.name == "general.architecture" or field.name.startswith("GGUF."):
                continue
            kind = field.types[0]
            sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
        for tensor in reader.tensors:
            name = hf_name(tensor.name, spec)
            if name not in replaced:
                writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
                continue
            if spec.permuted_qk and tensor.name.endswith(("attn_q.weight", "attn_k.weight")):
                raise InvalidOptionError(f"{tensor.name}: writing llama's permuted Q/K rows is not supported")
            source_type = tensor.tensor_type
            target = source_type if source_type.name in KEPT else gguf.GGMLQuantizationType[QUANTIZED]
            weights = np.array(replaced[name].astype(mx.float32))
            rows, cols = (int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions fastest first
            if weights.shape != (rows, cols):
                raise InvalidOptionError(f"{tensor.name}: new weights {weights.shape} do not match {(rows, cols)}")
            writer.add_tensor(tensor.name, _encode(weights, target), raw_dtype=target)
            written[tensor.name] = (source_type.name, target.name)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return written


def _encode(weights: np.ndarray, target: object) -> np.ndarray:
    """``weights`` (rows, cols) float32 as ``target``'s bytes (or values, for float types)."""
    import gguf

    name = target.name  # type: ignore[attr-defined]
    if name == "F32":
        return weights
    if name == "F16":
        return weights.astype(np.float16)
    return gguf.quants.quantize(weights, target)


__all__ = ["KEPT", "QUANTIZED", "write_replaced"]

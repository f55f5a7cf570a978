"""Write a Gemma 3 GGUF file of random weights in llama.cpp's Q4_K_M mix, for speed runs only.

    python benchmarks/gguf_random.py OUT.gguf [--size 270m|1b] [--seed 0]

For a machine the real weights cannot reach (the GPU machine takes 64 MiB per call): the file is
written there, from nothing but the ``gguf`` package. Shapes, tensor types and their mix are those
of llama.cpp's Q4_K_M Gemma 3 files (token_embd Q8_0; attn_q/attn_k/ffn_gate/ffn_up Q5_0;
attn_output Q4_K; ffn_down and attn_v alternating Q4_K/Q6_K and Q5_0/Q8_0 by layer), so the bytes
read and the kernels run are the real model's. Q8_0/Q5_0 blocks are ``gguf.quants.quantize`` of
normal(0, 0.02) values; the K-quants (which the package cannot write) are random blocks with small
fp16 scales. The vocabulary is synthetic (262,144 SentencePiece pieces, byte fallback): feed token
ids, and read the generated text as noise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

# hidden, layers, ffn, heads, kv heads (head_dim 256, vocab 262,144: every Gemma 3 text size)
SIZES = {"270m": (640, 18, 2048, 4, 1), "1b": (1152, 26, 6912, 4, 1)}
VOCAB, HEAD_DIM = 262_144, 256
# where each K-quant keeps its fp16 scales (d, dmin), and the value written there
K_SCALES = {T.Q4_K: {0: 2e-5, 2: 2e-5}, T.Q6_K: {208: 5e-6}}


def _vocab() -> tuple[list[str], list[float], list[int]]:
    tokens, types = ["<pad>", "<eos>", "<bos>", "<unk>"], [3, 3, 3, 2]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    rest = VOCAB - len(tokens)
    tokens += [f"▁p{i}" for i in range(rest)]
    types += [1] * rest
    return tokens, [0.0] * 260 + [-float(i) for i in range(rest)], types


def _tensor(qtype: T, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    if qtype in K_SCALES:
        block, size = GGML_QUANT_SIZES[qtype]
        data = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
        for at, value in K_SCALES[qtype].items():
            data[:, at : at + 2] = np.full((len(data), 1), value, dtype="<f2").view(np.uint8)
        return data.reshape(rows, cols // block * size)
    values = rng.normal(0, 0.02, size=(rows, cols)).astype(np.float32)
    return gguf.quants.quantize(values, qtype)


def write(out: Path, size: str = "1b", seed: int = 0) -> Path:
    """Write the file; return its path."""
    hidden, layers, ffn, heads, kv_heads = SIZES[size]
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(out), "gemma3")
    writer.add_name(f"random Gemma 3 {size}")
    writer.add_context_length(32768)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_sliding_window(512)
    writer.add_file_type(15)  # llama.cpp's MOSTLY_Q4_K_M
    tokens, scores, types = _vocab()
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)

    def norm(name: str, n: int) -> None:
        writer.add_tensor(name, (1.0 + rng.normal(0, 0.05, size=n)).astype(np.float32))  # llama.cpp stores 1 + w

    def matrix(name: str, qtype: T, rows: int, cols: int) -> None:
        writer.add_tensor(name, _tensor(qtype, rows, cols, rng), raw_dtype=qtype)

    matrix("token_embd.weight", T.Q8_0, VOCAB, hidden)
    norm("output_norm.weight", hidden)
    for i in range(layers):
        p, odd = f"blk.{i}.", i % 2 == 1
        for n in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
            norm(p + n + ".weight", hidden)
        norm(p + "attn_q_norm.weight", HEAD_DIM)
        norm(p + "attn_k_norm.weight", HEAD_DIM)
        matrix(p + "attn_q.weight", T.Q5_0, heads * HEAD_DIM, hidden)
        matrix(p + "attn_k.weight", T.Q5_0, kv_heads * HEAD_DIM, hidden)
        matrix(p + "attn_v.weight", T.Q8_0 if odd else T.Q5_0, kv_heads * HEAD_DIM, hidden)
        matrix(p + "attn_output.weight", T.Q4_K, hidden, heads * HEAD_DIM)
        matrix(p + "ffn_gate.weight", T.Q5_0, ffn, hidden)
        matrix(p + "ffn_up.weight", T.Q5_0, ffn, hidden)
        matrix(p + "ffn_down.weight", T.Q6_K if odd else T.Q4_K, hidden, ffn)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--size", default="1b", choices=list(SIZES))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(write(args.out, args.size, args.seed))


if __name__ == "__main__":
    main()

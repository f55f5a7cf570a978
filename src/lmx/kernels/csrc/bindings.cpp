// Python bindings of the lmx CPU kernels (module lmx.kernels._lmx_kernels).
#include <nanobind/nanobind.h>
#include <nanobind/stl/array.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "activation.h"
#include "attention_blas.h"
#include "blas.h"
#include "decode_layer.h"
#include "layer_ops.h"
#include "qmatmul.h"

namespace nb = nanobind;
using namespace nb::literals;
namespace mx = mlx::core;

NB_MODULE(_lmx_kernels, m) {
  m.doc() = "lmx CPU kernels: matmul against GGUF-quantized weights";
  m.def("qmatmul", &lmx::qmatmul, "x"_a, "w"_a, "type"_a, "k"_a, nb::kw_only(), "int8_activations"_a = false,
        "stream"_a = nb::none(),
        "x @ W^T for W stored as GGUF blocks: x (..., k) float, w (n, row_bytes) uint8 -> (..., n); "
        "int8_activations: x quantized to int8 per 32 values (llama.cpp's arithmetic, opt-in).");
  m.def("dequantize_rows", &lmx::dequantize_rows, "w"_a, "type"_a, "k"_a, nb::kw_only(), "stream"_a = nb::none(),
        "GGUF block rows (..., row_bytes) uint8 -> their float32 values (..., k).");
  m.def("block_geometry", [](int type) {
    auto g = lmx::block_geometry(type);
    return nb::make_tuple(g.values, g.bytes);
  }, "type"_a, "(values per block, bytes per block) of a GGML type; (0, 0) if unsupported.");
  m.def("rms_norm", &lmx::rms_norm, "x"_a, "weight"_a, "eps"_a, nb::kw_only(), "stream"_a = nb::none(),
        "mx.fast.rms_norm as one CPU op (float32; other inputs go to mx.fast.rms_norm).");
  m.def("rope_rows", &lmx::rope_rows, "x"_a, "dims"_a, "periods"_a, "scale"_a, "offsets"_a, nb::kw_only(),
        "stream"_a = nb::none(),
        "rope() with batch row b of x (B, ..., L, D) from position offsets[b] ((B,) int32) as one CPU op.");
  m.def("rope", &lmx::rope, "x"_a, "dims"_a, "periods"_a, "scale"_a, "offset"_a, nb::kw_only(),
        "stream"_a = nb::none(),
        "mx.fast.rope (non-traditional, freqs=periods) as one CPU op (float32; other inputs go to mx.fast.rope).");
  m.def("gelu_tanh_mul", &lmx::gelu_tanh_mul, "gate"_a, "up"_a, nb::kw_only(), "stream"_a = nb::none(),
        "gelu_pytorch_tanh(gate) * up as one threaded, vectorised CPU op (float32; else MLX's ops).");
  m.def("top_p", &lmx::top_p, "x"_a, "reach"_a, nb::kw_only(), "stream"_a = nb::none(),
        "The nucleus filter of each row of log-probabilities (the most likely tokens while the mass before them is "
        "below reach; the rest -inf) as one CPU op without a full sort; x (..., V) float32.");
  m.def("categorical", &lmx::categorical, "logits"_a, "u"_a, "temperature"_a, nb::kw_only(), "stream"_a = nb::none(),
        "One draw a row from softmax(logits / temperature) (B, V) float32, by the uniform numbers u (B,) float32 in "
        "[0, 1): the first token whose running weight passes u times the row's total. (B,) uint32.");
  m.def("logsumexp", &lmx::logsumexp, "x"_a, nb::kw_only(), "stream"_a = nb::none(),
        "mx.logsumexp(x, axis=-1, keepdims=True) as one vectorised CPU op (float32; else MLX's).");
  m.def("log_softmax", &lmx::log_softmax, "x"_a, nb::kw_only(), "stream"_a = nb::none(),
        "x - logsumexp(x) over the last axis as one threaded CPU op (float32; else MLX's ops): the values of "
        "x - logsumexp(x), bit for bit.");
  m.def("argmax", &lmx::argmax, "x"_a, nb::kw_only(), "stream"_a = nb::none(),
        "mx.argmax(x, axis=-1) as one threaded CPU op (float32; else MLX's): the first of ties, the first NaN.");
  m.def("attention_from", &lmx::attention_from, "q"_a, "k"_a, "v"_a, "scale"_a, "first"_a, nb::kw_only(),
        "stream"_a = nb::none(),
        "attention of one float32 query a row (B, H, 1, D) where row b sees the keys from index first[b] (B,) "
        "int32 on, as one CPU op: each row's value is what it gets over its own keys alone.");
  m.def("attention", &lmx::attention, "q"_a, "k"_a, "v"_a, "scale"_a, "causal"_a, nb::kw_only(),
        "stream"_a = nb::none(),
        "mx.fast.scaled_dot_product_attention (no mask or causal) as one CPU op for float32 queries (more than 8: "
        "blocked BLAS products).");
  m.def("attention_masked", &lmx::attention_masked, "q"_a, "k"_a, "v"_a, "scale"_a, "mask"_a, nb::kw_only(),
        "stream"_a = nb::none(),
        "mx.fast.scaled_dot_product_attention with a bool (B or 1, 1, Lq, Lk) mask as one CPU op for more than 8 "
        "float32 queries (blocked BLAS products); else MLX's.");
  m.def("quantized_attention_from", &lmx::quantized_attention_from, "q"_a, "kw"_a, "ks"_a, "kb"_a, "vw"_a, "vs"_a,
        "vb"_a, "scale"_a, "first"_a, "group_size"_a, "bits"_a, nb::kw_only(), "stream"_a = nb::none(),
        "quantized_attention of one float32 query a row (B, H, 1, D) where row b sees the keys from index first[b] "
        "(B,) int32 on: each row's value is what it gets over its own keys alone.");
  m.def("quantized_attention", &lmx::quantized_attention, "q"_a, "kw"_a, "ks"_a, "kb"_a, "vw"_a, "vs"_a, "vb"_a,
        "scale"_a, "causal"_a, "group_size"_a, "bits"_a, nb::kw_only(), "stream"_a = nb::none(),
        "attention over mx.quantize'd keys and values (8 or 4 bits; no mask or causal) as one CPU op for up to 8 "
        "float32 queries.");
  m.def(
      "decode_layer_begin",
      [](const mx::array& x, const mx::array& norm, float eps, const mx::array& wq, const mx::array& wk,
         const mx::array& wv, std::array<int, 3> types, int n_heads, int n_kv_heads, int head_dim,
         const mx::array& q_norm, const mx::array& k_norm, float head_eps, int rope_dims, const mx::array& periods,
         float rope_scale, std::variant<int, mx::array> offset, mx::StreamOrDevice s) {
        const auto* positions = std::get_if<mx::array>(&offset);
        lmx::BeginSpec spec{eps,       {types[0], types[1], types[2]},
                            n_heads,   n_kv_heads,
                            head_dim,  head_eps,
                            rope_dims, rope_scale,
                            positions ? 0 : std::get<int>(offset), positions ? 1 : 0};
        auto out = lmx::decode_layer_begin(x, norm, wq, wk, wv, q_norm, k_norm, periods, spec,
                                           positions ? std::optional<mx::array>(*positions) : std::nullopt, s);
        return nb::make_tuple(out[0], out[1], out[2]);
      },
      "x"_a, "norm"_a, "eps"_a, "wq"_a, "wk"_a, "wv"_a, "types"_a, "n_heads"_a, "n_kv_heads"_a, "head_dim"_a,
      "q_norm"_a, "k_norm"_a, "head_eps"_a, "rope_dims"_a, "periods"_a, "rope_scale"_a, "offset"_a, nb::kw_only(),
      "stream"_a = nb::none(),
      "A decoder layer up to attention for one position of B <= 8 rows, as one op: x (B, 1, dim) float32 -> "
      "(q, k, v), each (B, heads, 1, head_dim), normed and rotated as the separate ops do (GGUF-block weights; "
      "no gradient). offset: the position, or (B,) int32, each row's own.");
  m.def("decode_layer_end", &lmx::decode_layer_end, "x"_a, "attn"_a, "wo"_a, "post_attn"_a, "pre_ffn"_a, "wg"_a,
        "wu"_a, "wd"_a, "post_ffn"_a, "types"_a, "eps"_a, nb::kw_only(), "stream"_a = nb::none(),
        "Gemma 3's decoder layer after attention for one position of B <= 8 rows, as one op (GGUF-block weights; "
        "the separate ops' values; no gradient).");
  m.def("set_num_threads", &lmx::set_num_threads, "n"_a, "Threads the kernels use (the caller included).");
  m.def("num_threads", &lmx::num_threads);
  m.def("set_pool_spin", &lmx::set_pool_spin, "microseconds"_a,
        "How long the kernels' threads poll for the next job before they sleep (0: at once). For benchmarks.");
  m.def("huge_pages", &lmx::huge_pages, "w"_a,
        "Back w's buffer (whole 2 MiB pages of it) with transparent huge pages; returns the bytes backed so.");
  m.def("set_prefetch_rows", &lmx::set_prefetch_rows, "rows"_a,
        "W rows a decode product asks memory for ahead of the one it decodes (default 4; 0: none; the same values). For benchmarks.");
  m.def("sgemm_name", &lmx::sgemm_name,
        "The BLAS symbol prompt products call (scipy_cblas_sgemm, cblas_sgemm, or '': none, MLX's matmul instead).");
  m.def("has_avx2", &lmx::has_avx2, "Whether the AVX2/FMA code path is in use.");
  m.def("set_avx512", &lmx::set_avx512, "allowed"_a,
        "Whether decode products (one row and 2-8 rows) may use the AVX-512VL copy (default: where the CPU has it; same "
        "values); "
        "returns whether it is in use now.");
}

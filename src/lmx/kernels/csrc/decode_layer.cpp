// The two fused pieces of decode_layer.h.
#include "decode_layer.h"

#include <cstring>
#include <sstream>
#include <stdexcept>

#include "activation.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "qmatmul.h"
#include "rows.h"
#include "strided.h"

namespace lmx {
namespace {

constexpr int64_t kMaxRows = 8;  // decode rows (qmatmul's one-pass products)

[[noreturn]] void fail(const char* what, const std::string& why) {
  throw std::invalid_argument(std::string(what) + ": " + why);
}

std::string shape_of(const mx::array& a) {
  std::ostringstream out;
  out << "(";
  for (auto d : a.shape()) out << d << ",";
  out << ")";
  return out.str();
}

// A weight of GGUF blocks: rows of k values of `type`, `n` rows; evaluated and row-major already
// (as loaded), else made so.
mx::array blocks(const char* what, const char* name, const mx::array& w, int type, int64_t k, int64_t n,
                 mx::StreamOrDevice s) {
  const BlockGeometry g = block_geometry(type);
  if (g.values == 0 || k % g.values) {
    fail(what, std::string(name) + ": GGML type " + std::to_string(type) + " cannot hold rows of " +
                   std::to_string(k) + " values");
  }
  if (w.dtype() != mx::uint8 || w.ndim() != 2 || w.shape(0) != n || w.shape(1) != k / g.values * g.bytes) {
    fail(what, std::string(name) + " must be uint8 (" + std::to_string(n) + ", " +
                   std::to_string(k / g.values * g.bytes) + "), got " + shape_of(w));
  }
  const bool ready = w.status() != mx::array::Status::unscheduled && w.flags().row_contiguous;
  return ready ? w : mx::contiguous(w, false, s);
}

void vector_of(const char* what, const char* name, const mx::array& a, int64_t n) {
  if (a.dtype() != mx::float32 || a.ndim() != 1 || a.shape(0) != n) {
    fail(what, std::string(name) + " must be float32 (" + std::to_string(n) + ",), got " + shape_of(a));
  }
}

// x (B, 1, dim) float32 with 1 <= B <= 8.
int64_t decode_rows(const char* what, const mx::array& x, int64_t dim) {
  if (x.dtype() != mx::float32 || x.ndim() != 3 || x.shape(1) != 1 || x.shape(2) != dim || x.shape(0) < 1 ||
      x.shape(0) > kMaxRows) {
    fail(what, "x must be float32 (B, 1, " + std::to_string(dim) + ") with 1 <= B <= 8, got " + shape_of(x));
  }
  return x.shape(0);
}

// Every output allocated and registered with the stream's encoder, with the inputs.
mx::cpu::CommandEncoder& begin_outputs(mx::Stream stream, const std::vector<mx::array>& inputs,
                                       std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream);
  for (const auto& a : inputs) encoder.set_input_array(a);
  for (auto& o : outputs) {
    o.set_data(mx::allocator::malloc(o.nbytes()));
    encoder.set_output_array(o);
  }
  return encoder;
}

DecodeProduct product(const mx::array& w, int type, int64_t k, const float* x, int64_t m, float* y) {
  return DecodeProduct{w.data<uint8_t>(), w.shape(1), type, k, w.shape(0), x, m, y};
}

// rms_norm_row over `rows` rows of n values, in place.
void norm_rows(float* x, int64_t rows, int64_t n, const mx::array& w, float eps) {
  const float* wp = w.data<float>();
  const int64_t ws = w.strides()[0];
  for (int64_t r = 0; r < rows; ++r) rms_norm_row(x + r * n, wp, ws, eps, n, x + r * n);
}

}  // namespace

std::vector<mx::array> decode_layer_begin(const mx::array& x, const mx::array& norm, const mx::array& wq,
                                          const mx::array& wk, const mx::array& wv, const mx::array& q_norm,
                                          const mx::array& k_norm, const mx::array& periods, const BeginSpec& spec,
                                          const std::optional<mx::array>& positions, mx::StreamOrDevice s) {
  const char* what = "decode_layer_begin";
  if (spec.n_heads < 1 || spec.n_kv_heads < 1 || spec.head_dim < 1 || spec.rope_dims % 2 || spec.rope_dims < 0 ||
      spec.rope_dims > spec.head_dim) {
    fail(what, "heads, head_dim or rope_dims out of range");
  }
  const int64_t dim = norm.ndim() == 1 ? norm.shape(0) : -1;
  vector_of(what, "norm", norm, dim);
  const int64_t rows = decode_rows(what, x, dim);
  const int64_t hd = spec.head_dim, q_out = spec.n_heads * hd, kv_out = spec.n_kv_heads * hd;
  auto q_w = blocks(what, "wq", wq, spec.types[0], dim, q_out, s);
  auto k_w = blocks(what, "wk", wk, spec.types[1], dim, kv_out, s);
  auto v_w = blocks(what, "wv", wv, spec.types[2], dim, kv_out, s);
  vector_of(what, "q_norm", q_norm, hd);
  vector_of(what, "k_norm", k_norm, hd);
  vector_of(what, "periods", periods, spec.rope_dims / 2);
  if (spec.rows_at != (positions ? 1 : 0)) {
    fail(what, "positions must be given exactly when spec.rows_at is 1");
  }
  if (positions && (positions->dtype() != mx::int32 || positions->ndim() != 1 || positions->shape(0) != rows)) {
    fail(what, "positions must be int32 (" + std::to_string(rows) + ",), one a row of x, got " + shape_of(*positions));
  }
  std::vector<mx::array> inputs{x, norm, q_w, k_w, v_w, q_norm, k_norm, periods};
  if (positions) inputs.push_back(*positions);
  std::vector<mx::Shape> shapes{{static_cast<int>(rows), spec.n_heads, 1, spec.head_dim},
                                {static_cast<int>(rows), spec.n_kv_heads, 1, spec.head_dim},
                                {static_cast<int>(rows), spec.n_kv_heads, 1, spec.head_dim}};
  return mx::array::make_arrays(std::move(shapes), {mx::float32, mx::float32, mx::float32},
                                std::make_shared<DecodeLayerBegin>(mx::to_stream(s), spec), std::move(inputs));
}

void DecodeLayerBegin::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& encoder = begin_outputs(stream(), inputs, outputs);
  encoder.dispatch([in = inputs, q = outputs[0].data<float>(), k = outputs[1].data<float>(),
                    v = outputs[2].data<float>(), spec = spec_]() {
    const auto &x = in[0], &norm = in[1], &wq = in[2], &wk = in[3], &wv = in[4];
    const int64_t dim = norm.shape(0), rows = x.size() / dim, hd = spec.head_dim;
    std::vector<float> tmp;
    const float* xp = row_major(x, tmp);
    std::vector<float> xn(xp, xp + rows * dim);
    norm_rows(xn.data(), rows, dim, norm, spec.eps);
    const DecodeProduct ps[3] = {product(wq, spec.types[0], dim, xn.data(), rows, q),
                                 product(wk, spec.types[1], dim, xn.data(), rows, k),
                                 product(wv, spec.types[2], dim, xn.data(), rows, v)};
    decode_products(ps, 3);
    const int64_t half = spec.rope_dims / 2, tables = spec.rows_at ? rows : 1;
    std::vector<float> cosv(tables * half), sinv(tables * half);  // one table, or one a row
    rope_tables(in[7].data<float>(), in[7].strides()[0], half, spec.rope_scale, spec.offset,
                spec.rows_at ? in[8].data<int32_t>() : nullptr, spec.rows_at ? in[8].strides()[0] : 0, tables, 1,
                cosv.data(), sinv.data());
    auto heads = [&](float* y, int64_t n_heads, const mx::array& w) {
      norm_rows(y, rows * n_heads, hd, w, spec.head_eps);
      for (int64_t r = 0; r < rows * n_heads; ++r) {
        const int64_t at = spec.rows_at ? r / n_heads * half : 0;  // y is (B, heads, 1, head_dim)
        rope_row(y + r * hd, cosv.data() + at, sinv.data() + at, half, hd, y + r * hd);
      }
    };
    heads(q, spec.n_heads, in[5]);
    heads(k, spec.n_kv_heads, in[6]);
  });
}

void DecodeLayerBegin::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("LmxDecodeLayerBegin has no GPU implementation");
}

std::vector<mx::array> DecodeLayerBegin::vjp(const std::vector<mx::array>&, const std::vector<mx::array>&,
                                             const std::vector<int>&, const std::vector<mx::array>&) {
  throw std::invalid_argument("decode_layer_begin has no gradient (lmx runs it only in a decode step)");
}

bool DecodeLayerBegin::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const DecodeLayerBegin&>(other).spec_;
  return std::memcmp(&o, &spec_, sizeof(BeginSpec)) == 0;
}

mx::array decode_layer_end(const mx::array& x, const mx::array& attn, const mx::array& wo,
                           const mx::array& post_attn, const mx::array& pre_ffn, const mx::array& wg,
                           const mx::array& wu, const mx::array& wd, const mx::array& post_ffn,
                           const std::vector<int>& types, float eps, mx::StreamOrDevice s) {
  const char* what = "decode_layer_end";
  if (types.size() != 4) {
    fail(what, "types must hold the GGML types of wo, wg, wu and wd");
  }
  const int64_t dim = post_attn.ndim() == 1 ? post_attn.shape(0) : -1;
  vector_of(what, "post_attn", post_attn, dim);
  vector_of(what, "pre_ffn", pre_ffn, dim);
  vector_of(what, "post_ffn", post_ffn, dim);
  const int64_t rows = decode_rows(what, x, dim);
  if (attn.dtype() != mx::float32 || attn.ndim() != 4 || attn.shape(0) != rows || attn.shape(2) != 1) {
    fail(what, "attn must be float32 (B, heads, 1, head_dim) for x's B rows, got " + shape_of(attn));
  }
  const int64_t width = attn.shape(1) * attn.shape(3), hidden = wg.ndim() == 2 ? wg.shape(0) : -1;
  auto o_w = blocks(what, "wo", wo, types[0], width, dim, s);
  auto g_w = blocks(what, "wg", wg, types[1], dim, hidden, s);
  auto u_w = blocks(what, "wu", wu, types[2], dim, hidden, s);
  auto d_w = blocks(what, "wd", wd, types[3], hidden, dim, s);
  return mx::array(x.shape(), mx::float32, std::make_shared<DecodeLayerEnd>(mx::to_stream(s), types, eps),
                   {x, attn, o_w, post_attn, pre_ffn, g_w, u_w, d_w, post_ffn});
}

void DecodeLayerEnd::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  std::vector<mx::array> outputs{out};
  auto& encoder = begin_outputs(stream(), inputs, outputs);
  encoder.dispatch([in = inputs, y = out.data<float>(), types = types_, eps = eps_]() {
    const auto &x = in[0], &attn = in[1], &wo = in[2], &wg = in[5], &wu = in[6], &wd = in[7];
    const int64_t dim = x.shape(2), rows = x.shape(0), width = attn.size() / rows, hidden = wg.shape(0);
    std::vector<float> tx, ta;
    const float* xp = row_major(x, tx);
    const float* ap = row_major(attn, ta);  // (B, heads * head_dim): the heads merged
    std::vector<float> h(rows * dim), hn(rows * dim), gate(rows * hidden), up(rows * hidden), act(rows * hidden);
    const DecodeProduct o = product(wo, types[0], width, ap, rows, h.data());
    decode_products(&o, 1);
    norm_rows(h.data(), rows, dim, in[3], eps);
    for (int64_t i = 0; i < rows * dim; ++i) h[i] = xp[i] + h[i];
    hn = h;
    norm_rows(hn.data(), rows, dim, in[4], eps);
    const DecodeProduct gu[2] = {product(wg, types[1], dim, hn.data(), rows, gate.data()),
                                 product(wu, types[2], dim, hn.data(), rows, up.data())};
    decode_products(gu, 2);
    gelu_tanh_mul_values(gate.data(), up.data(), act.data(), rows * hidden);
    const DecodeProduct d = product(wd, types[3], hidden, act.data(), rows, hn.data());
    decode_products(&d, 1);
    norm_rows(hn.data(), rows, dim, in[8], eps);
    for (int64_t i = 0; i < rows * dim; ++i) y[i] = h[i] + hn[i];
  });
}

void DecodeLayerEnd::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("LmxDecodeLayerEnd has no GPU implementation");
}

std::vector<mx::array> DecodeLayerEnd::vjp(const std::vector<mx::array>&, const std::vector<mx::array>&,
                                           const std::vector<int>&, const std::vector<mx::array>&) {
  throw std::invalid_argument("decode_layer_end has no gradient (lmx runs it only in a decode step)");
}

bool DecodeLayerEnd::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const DecodeLayerEnd&>(other);
  return types_ == o.types_ && eps_ == o.eps_;
}

}  // namespace lmx

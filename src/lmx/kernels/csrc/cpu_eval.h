// What every eval_cpu of lmx's MLX primitives starts with.
#pragma once

#include <vector>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"

namespace lmx {

namespace mx = mlx::core;

// The start of every eval_cpu of lmx's ops: `out` allocated, the arrays registered with the
// stream's CPU encoder (which keeps them alive until the dispatched work has run).
inline mx::cpu::CommandEncoder& begin_eval(mx::Stream stream, const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream);
  for (const auto& a : inputs) encoder.set_input_array(a);
  encoder.set_output_array(out);
  return encoder;
}

}  // namespace lmx

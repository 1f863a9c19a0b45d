// Torch-free entry points of the clipped value loss (csrc/cpu/value.cpp, csrc/cuda/value.cu). All
// checking happens in Python (python/fusedrl/ops/value.py) before the call.
#pragma once

#include <cstdint>

#include "fusedrl/view.h"  // View: a [rows, tokens] operand
#include "fusedrl/value.h"

namespace fusedrl {

struct ValueArgs {
  View values, old_values, returns, mask;  // old_values absent: = values (no clip then)
  const int64_t* cu_seqlens = nullptr;     // [B + 1] (packed layout) or null (padded: every row T long)
  int64_t B = 0, T = 0;
  value::Options opt;
  const double* coef = nullptr;  // [B]: the row coefficients g
  double* rows = nullptr;        // [B, kNumOutputs]
  View grad;                     // d loss / d values in its dtype (null: not wanted); padded tokens get 0
  int64_t num_threads = 1;       // CPU only
};

namespace cpu {
// One pass: the rows' loss shares, metric sums and the gradient.
bool value_loss(const ValueArgs& a);
}  // namespace cpu

#if defined(FUSEDRL_WITH_CUDA)
namespace cuda {
// stream is a cudaStream_t passed as an integer handle. Returns a CUDA error string or null.
const char* value_loss(const ValueArgs& a, uintptr_t stream);
}  // namespace cuda
#endif

}  // namespace fusedrl

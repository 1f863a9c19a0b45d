// Arguments and torch-free entry points of the token log-prob kernels (csrc/cpu/logprobs.cpp,
// csrc/cuda/logprobs.cu). All checking happens in Python before the call.
#pragma once

#include <cstdint>

namespace fusedrl {

// Arguments of the token log-prob kernels (forward and backward), shared by the CPU and CUDA
// entry points. Pointers are raw data pointers; logp/entropy/row_max/log_norm/grad_logp/
// grad_entropy are fp32 (fp64 when dtype is fp64); grad_logits has the logits' dtype. Optional
// pointers may be null. A row's log-sum-exp is kept as the pair row_max + log_norm (logprobs.h).
struct LogprobArgs {
  const void* logits = nullptr;   // [N, V] rows at row_stride elements, unit stride along V
  const int64_t* labels = nullptr;  // [N]
  int dtype = 0;                  // fusedrl::DType of logits (and grad_logits)
  int64_t N = 0, V = 0, row_stride = 0;
  int64_t ignore_index = -100;
  double inv_temp = 1.0;
  void* logp = nullptr;           // forward out [N]
  void* entropy = nullptr;        // forward out [N] (null: not computed); backward in
  void* row_max = nullptr;        // forward out [N]: max_v z_v / T; backward in
  void* log_norm = nullptr;       // forward out [N]: log sum_v exp(z_v / T - row_max); backward in
  const void* grad_logp = nullptr;     // backward in [N] (null: zero)
  const void* grad_entropy = nullptr;  // backward in [N] (null: zero)
  void* grad_logits = nullptr;    // backward out [N, V] rows at grad_row_stride; may be logits itself
  int64_t grad_row_stride = 0;
  int64_t num_threads = 1;        // CPU only
};

namespace cpu {
bool logprobs_forward(const LogprobArgs& a);
bool logprobs_backward(const LogprobArgs& a);
}  // namespace cpu

#if defined(FUSEDRL_WITH_CUDA)
namespace cuda {
// stream is a cudaStream_t passed as an integer handle. Return a CUDA error string or null.
const char* logprobs_forward(const LogprobArgs& a, uintptr_t stream);
const char* logprobs_backward(const LogprobArgs& a, uintptr_t stream);
}  // namespace cuda
#endif

}  // namespace fusedrl

// Torch-free entry points of the fused policy objective (csrc/cpu/policy.cpp, csrc/cuda/policy.cu).
// All checking happens in Python (python/fusedrl/ops/policy.py) before the call.
#pragma once

#include <cstdint>

#include "fusedrl/policy.h"
#include "fusedrl/view.h"  // View: a [rows, tokens] operand

namespace fusedrl {

struct PolicyArgs {
  View logp, old_logp, adv, mask, ref_logp, rollout_logp, entropy;  // old_logp absent: = logp
  const int64_t* cu_seqlens = nullptr;  // [B + 1] (packed layout) or null (padded: every row T long)
  int64_t B = 0, T = 0;
  policy::Options opt;
  double* stats = nullptr;        // [B, kNumStats]: pass 1 writes, pass 2 reads (null: not needed)
  bool stats_adv = false;         // pass 1 also sums the advantages (balanced aggregation; geo_mean always)
  const double* coef = nullptr;   // [B, 3]: g, gk, ge (pass 2)
  double* rows = nullptr;         // [B, kNumOutputs] (pass 2)
  View grad_logp, grad_entropy;   // pass 2 outputs in their dtype (null: not wanted); padded tokens get 0
  int64_t num_threads = 1;        // CPU only
};

namespace cpu {
// Pass 1: the row statistics. Pass 2: the rows' loss shares, metric sums and gradients.
bool policy_stats(const PolicyArgs& a);
bool policy_loss(const PolicyArgs& a);
}  // namespace cpu

#if defined(FUSEDRL_WITH_CUDA)
namespace cuda {
// stream is a cudaStream_t passed as an integer handle. Return a CUDA error string or null.
const char* policy_stats(const PolicyArgs& a, uintptr_t stream);
const char* policy_loss(const PolicyArgs& a, uintptr_t stream);
}  // namespace cuda
#endif

}  // namespace fusedrl

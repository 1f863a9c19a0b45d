// Torch-free entry points of the segment-statistics kernels (csrc/cpu/segments.cpp,
// csrc/cuda/segments.cu). All checking happens in Python before the call.
#pragma once

#include <cstdint>

namespace fusedrl {

// Per-group statistics of values [M, C] (fusedrl/segments.h). Groups are either contiguous
// fixed-size runs (index null: row r is in group r / group_size) or given by dense ids
// index [M] in [0, G). Outputs are in the accumulation type (fp32, fp64 for fp64 values):
// count [G], mean/var/std/max/second/wmean [G, C], argmax [G, C] int64, loo [M, C]
// (all contiguous; loo may be null: not computed). weight [M] (accumulation type) may be null (then wmean = mean).
struct SegmentArgs {
  const void* values = nullptr;
  int dtype = 0;  // fusedrl::DType of values
  int64_t M = 0, C = 0, row_stride = 0, col_stride = 0;
  const int64_t* index = nullptr;
  int64_t group_size = 0;  // used when index is null
  int64_t G = 0;
  const void* weight = nullptr;
  int singleton = 0;  // fusedrl::SingletonRule
  void* count = nullptr;
  void* mean = nullptr;
  void* var = nullptr;
  void* std = nullptr;
  void* loo = nullptr;
  void* max = nullptr;
  void* second = nullptr;
  int64_t* argmax = nullptr;
  void* wmean = nullptr;
  int64_t num_threads = 1;  // CPU only
  // CSR layout of the dense ids: the rows of group g are order[offsets[g] .. offsets[g + 1]) in
  // increasing row order. The CPU kernel builds it itself (counting sort); the CUDA launcher is
  // given it (a stable device sort in Python).
  const int64_t* offsets = nullptr;
  const int64_t* order = nullptr;
};

// Group advantages of rewards [M, K] in one call (fusedrl/segments.h: GroupEstimator,
// GroupScale, GroupCombine, GroupFinish): the group layout is either raw ids [M] (int32 or int64,
// any values in any order; keyed here through a byte map when their range is small, else a hash)
// or contiguous runs of group_size rows.
// out [M] is in the accumulation type (fp32, fp64 for fp64 rewards). weight [M] (accumulation type)
// is OPO's per-row length (kOpo only).
struct GroupAdvantageArgs {
  const void* values = nullptr;
  int dtype = 0;
  int64_t M = 0, K = 0, row_stride = 0, col_stride = 0;
  const void* ids = nullptr;
  bool ids_int32 = false;
  int64_t ids_stride = 1;
  int64_t group_size = 0;  // used when ids is null
  const void* weight = nullptr;
  int estimator = 0, scale = 0, singleton = 0, combine = 0, finish = 0;
  double eps = 1e-6, var_coef = 1.0;
  const double* weights = nullptr;  // [K]
  const double* ideal = nullptr;    // [K] (chebyshev)
  void* out = nullptr;
  int64_t num_threads = 1;
};

// Status codes of cpu::group_advantages.
enum GroupAdvantageStatus : int { kGroupOk = 0, kGroupBadDtype = 1, kGroupTooSmall = 2 };

namespace cpu {
bool segment_stats(const SegmentArgs& a);
// Returns a GroupAdvantageStatus; kGroupTooSmall: grpo_passk met a group of fewer than 2 rows.
int group_advantages(const GroupAdvantageArgs& a);
}  // namespace cpu

#if defined(FUSEDRL_WITH_CUDA)
namespace cuda {
// offsets/order must be set when index is set. Returns a CUDA error string or null.
const char* segment_stats(const SegmentArgs& a, uintptr_t stream);
}  // namespace cuda
#endif

}  // namespace fusedrl

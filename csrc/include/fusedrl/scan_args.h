// Torch-free entry points of the scan kernels (GAE, discounted returns, prefix sums), shared by the
// CPU (csrc/cpu/scan.cpp) and CUDA (csrc/cuda/scan.cu) bindings. All checking happens in Python.
#pragma once

#include <cstdint>

namespace fusedrl {

// Mask element codes (python/fusedrl/ops/scan.py keeps the same table); nonzero = valid.
enum MaskCode : int { kMaskByte = 0, kMaskInt32 = 1, kMaskInt64 = 2, kMaskFloat32 = 3, kMaskFloat64 = 4 };

// Arguments of the scans over a padded [B, T] layout. Inputs have unit stride along T and rows at
// their own row strides (elements); outputs are contiguous [B, T] in fp32 (fp64 when dtype is
// fp64). x = rewards (GAE, returns) or the summed values (prefix sum); values may be null
// (returns, prefix sum); bootstrap [B] is in the output dtype or null (0).
struct ScanArgs {
  const void* x = nullptr;
  const void* values = nullptr;
  const void* mask = nullptr;
  const void* bootstrap = nullptr;
  int dtype = 0;       // fusedrl::DType of x and values
  int mask_code = 0;   // MaskCode
  int64_t B = 0, T = 0;
  int64_t x_stride = 0, values_stride = 0, mask_stride = 0;
  double gamma = 1.0, lam = 1.0;
  void* out = nullptr;      // advantages / returns / prefix sums [B, T]
  void* returns = nullptr;  // GAE returns [B, T] (null for the other scans)
  bool whiten = false;      // whiten `out` over the valid tokens (GAE)
  void* workspace = nullptr;  // whitening scratch (layout: csrc/cpu/scan.cpp, csrc/cuda/scan.cu)
  int64_t num_threads = 1;  // CPU only
};

namespace cpu {
// Reverse scan: GAE when values != null, discounted returns (values 0, lam 1) otherwise.
bool reverse_scan(const ScanArgs& a);
// Masked prefix sum along T.
bool prefix_sum(const ScanArgs& a);
}  // namespace cpu

#if defined(FUSEDRL_WITH_CUDA)
namespace cuda {
// stream is a cudaStream_t passed as an integer handle. Return a CUDA error string or null.
const char* reverse_scan(const ScanArgs& a, uintptr_t stream);
const char* prefix_sum(const ScanArgs& a, uintptr_t stream);
}  // namespace cuda
#endif

}  // namespace fusedrl

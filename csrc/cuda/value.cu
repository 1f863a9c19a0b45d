// The clipped value loss on the GPU: the CUDA twin of csrc/cpu/value.cpp (same semantics, same
// per-token math: fusedrl/value.h, whose functions are host/device). One pass writes the rows
// [B, kNumOutputs] and d loss / d values in the values' dtype (padded tokens get 0).
//
// Launch shape (as csrc/cuda/policy.cu): one block of kThreads threads per row (grid-stride over
// rows, so the block index is uniform and every barrier is reached by the whole block); a row is
// walked in chunks of kThreads consecutive tokens, one token per thread (coalesced loads and
// stores). Every operand is converted to the accumulation type A right after its load (float for
// fp32 / bf16 / fp16 values, double for fp64) and selected to 0 on tokens with mask == 0 (padded
// tokens load nothing but the mask). Each thread accumulates its tokens' contributions in double;
// the block reduces them in a fixed order (a shuffle tree per warp, then the warp sums in warp
// order), so the per-row results are reproducible run to run.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "fusedrl/value_args.h"

namespace fusedrl {
namespace cuda {
namespace {

using namespace ::fusedrl::value;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Mask codes beyond the float DType codes (fusedrl/policy.h MaskCode).
// s[0, kNumOutputs) <- the block's sums (thread 0 gets them): a shuffle tree per warp, then the
// warp sums in warp order. Ends with a barrier, so the shared scratch can be reused.
__device__ void block_sum(double* s, double (*sm)[kNumOutputs]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int j = 0; j < kNumOutputs; ++j) {
    double x = s[j];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) x += __shfl_down_sync(kFullMask, x, off);
    if (lane == 0) sm[warp][j] = x;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int j = 0; j < kNumOutputs; ++j) {
      double t = sm[0][j];
      for (int w = 1; w < kWarps; ++w) t += sm[w][j];
      s[j] = t;
    }
  }
  __syncthreads();
}

template <typename A> __global__ void __launch_bounds__(kThreads) value_kernel(const __grid_constant__ ValueArgs a) {
  __shared__ double sm[kWarps][kNumOutputs];
  const A c = A(a.opt.clip), ties = a.opt.verl_ties ? A(1) : A(0);
  const bool want_g = a.grad.p != nullptr, has_old = a.old_values.p != nullptr;
  for (int64_t i = blockIdx.x; i < a.B; i += gridDim.x) {  // i uniform over the block
    int64_t start = 0, len = a.T;
    if (a.cu_seqlens) {
      start = a.cu_seqlens[i];
      len = a.cu_seqlens[i + 1] - start;
    }
    const A g = A(a.coef[i]);
    double s[kNumOutputs] = {0.0, 0.0, 0.0, 0.0};
    for (int64_t t = threadIdx.x; t < len; t += kThreads) {
      const int64_t pos = start + t;
      const A m = load_elem<A>(a.mask, i, pos);
      A gv = A(0);
      if (m != A(0)) {
        const A v = load_elem<A>(a.values, i, pos);
        const A old = has_old ? load_elem<A>(a.old_values, i, pos) : v;
        const A ret = load_elem<A>(a.returns, i, pos);
        A dv, clipped;
        const A l = token_loss(v, old, ret, c, ties, &dv, &clipped);
        gv = g * m * dv;
        s[kLoss] += double(m * l);
        s[kOutCount] += double(m);
        s[kClipped] += double(m * clipped);
        s[kValue] += double(m * v);
      }
      if (want_g) store_elem(a.grad, i, pos, gv);
    }
    block_sum(s, sm);
    if (threadIdx.x == 0) {
      double* out = a.rows + i * kNumOutputs;
      out[kLoss] = double(g) * s[kLoss];
      out[kOutCount] = s[kOutCount];
      out[kClipped] = s[kClipped];
      out[kValue] = s[kValue];
    }
  }
}

}  // namespace

const char* value_loss(const ValueArgs& a, uintptr_t stream) {
  if (a.values.dtype < kFloat32 || a.values.dtype > kFloat64) return "fusedrl: unsupported dtype code";
  if (a.B <= 0) return nullptr;
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const unsigned grid = static_cast<unsigned>(a.B < INT_MAX ? a.B : INT_MAX);
  if (a.values.dtype == kFloat64) value_kernel<double><<<grid, kThreads, 0, s>>>(a);
  else value_kernel<float><<<grid, kThreads, 0, s>>>(a);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace cuda
}  // namespace fusedrl

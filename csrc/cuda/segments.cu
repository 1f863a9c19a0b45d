// Segment (group) statistics on the GPU: the CUDA twin of csrc/cpu/segments.cpp. One thread per
// group runs fusedrl::segment_group (fusedrl/segments.h, the same code as the CPU kernel), so a
// group's sums have the same fixed row order as on the CPU. Dense ids arrive with their CSR
// layout (offsets, order) built by the launcher (a stable device sort, python/fusedrl/ops/segments.py).
#include <cuda_runtime.h>

#include <cstdint>

#include "fusedrl/segments_args.h"
#include "fusedrl/segments.h"

namespace fusedrl {
namespace cuda {
namespace {

constexpr int kThreads = 128;

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename T>
__global__ void segment_kernel(const SegmentArgs a) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; g < a.G; g += stride) {
    segment_group<T, typename Acc<T>::type>(a, g);
  }
}

template <typename T> const char* launch(const SegmentArgs& a, cudaStream_t stream) {
  const int64_t blocks = (a.G + kThreads - 1) / kThreads;
  const unsigned grid = static_cast<unsigned>(blocks < 65535 ? blocks : 65535);
  segment_kernel<T><<<grid, kThreads, 0, stream>>>(a);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* segment_stats(const SegmentArgs& a, uintptr_t stream) {
  if (a.G <= 0) return nullptr;
  if (a.index && (!a.offsets || !a.order)) return "segment_stats: dense ids need their CSR layout";
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case kFloat32: return launch<float>(a, s);
    case kBFloat16: return launch<bf16_t>(a, s);
    case kFloat16: return launch<f16_t>(a, s);
    case kFloat64: return launch<double>(a, s);
    default: return "segment_stats: unsupported dtype code";
  }
}

}  // namespace cuda
}  // namespace fusedrl

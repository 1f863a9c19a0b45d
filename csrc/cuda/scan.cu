// Masked scans along T on the GPU: the CUDA twin of csrc/cpu/scan.cpp (same semantics), with the
// per-step math of fusedrl/scan.h.
//
// Scans: one thread per row walks T sequentially (t = T-1 .. 0 for GAE / returns, 0 .. T-1 for the
// prefix sum) with its carries in registers; masked tokens write 0 and leave the carries alone.
// Consecutive steps of a thread read consecutive addresses, so each cache line fetched serves the
// next steps from L1/L2. Whitening: the same thread sums its row's valid advantages in double,
// shifted by the first one (moments_from_shifted_sums), one thread merges the rows in row order (moments_merge, whiten_coeffs), and an
// elementwise pass rescales the valid advantages: the statistics do not depend on the launch shape.
#include <cuda_runtime.h>

#include <cstdint>

#include "fusedrl/scan_args.h"
#include "fusedrl/scan.h"

namespace fusedrl {
namespace cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWhitenThreads = 256;

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

FUSEDRL_HD float upcast(float x) { return x; }
FUSEDRL_HD float upcast(bf16_t x) { return to_float(x); }
FUSEDRL_HD float upcast(f16_t x) { return to_float(x); }
FUSEDRL_HD double upcast(double x) { return x; }

template <typename M> FUSEDRL_HD bool is_valid(const M* p, int64_t i) { return p[i] != M(0); }

template <typename E> struct ScanParams {  // E: the input element type
  using acc_t = typename Acc<E>::type;
  const E* __restrict__ x;
  const E* __restrict__ values;  // null: discounted returns
  const void* __restrict__ mask;
  const acc_t* __restrict__ bootstrap;  // null: 0
  int64_t B, T, x_stride, values_stride, mask_stride;
  acc_t gamma, decay;
  acc_t* __restrict__ out;
  acc_t* __restrict__ returns;
  double* __restrict__ workspace;  // null: no whitening
};

template <typename T, typename M, bool HAS_V>
__global__ void reverse_kernel(ScanParams<T> p) {
  using acc_t = typename Acc<T>::type;
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= p.B) return;
  const T* x = p.x + b * p.x_stride;
  const T* v = HAS_V ? p.values + b * p.values_stride : nullptr;
  const M* m = static_cast<const M*>(p.mask) + b * p.mask_stride;
  acc_t* out = p.out + b * p.T;
  acc_t* ret = HAS_V ? p.returns + b * p.T : nullptr;
  acc_t c = acc_t(0);
  acc_t vn = (HAS_V && p.bootstrap) ? p.bootstrap[b] : acc_t(0);
  const bool moments = HAS_V && p.workspace;
  double n = 0.0, k = 0.0, s1 = 0.0, s2 = 0.0;  // whitening: shifted sums (scan.h)
  for (int64_t t = p.T - 1; t >= 0; --t) {
    const bool ok = is_valid(m, t);
    const acc_t r = upcast(x[t]);
    if (HAS_V) {
      const acc_t val = upcast(v[t]);
      const acc_t s = scan_step(gae_delta(r, val, vn, p.gamma), c, p.decay);
      out[t] = ok ? s : acc_t(0);
      ret[t] = ok ? s + val : acc_t(0);
      c = ok ? s : c;
      vn = ok ? val : vn;
      if (moments) {
        const double sd = double(s);
        k = (ok && n == 0.0) ? sd : k;
        const double d = ok ? sd - k : 0.0;
        s1 += d;
        s2 += d * d;
        n += ok ? 1.0 : 0.0;
      }
    } else {
      const acc_t s = scan_step(r, c, p.decay);
      out[t] = ok ? s : acc_t(0);
      c = ok ? s : c;
    }
  }
  if (moments) {
    const MomentState st = moments_from_shifted_sums(n, k, s1, s2);
    p.workspace[3 * b] = st.n;
    p.workspace[3 * b + 1] = st.mean;
    p.workspace[3 * b + 2] = st.m2;
  }
}

__global__ void merge_kernel(double* ws, int64_t B) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  MomentState tot = moments_empty();
  for (int64_t b = 0; b < B; ++b) {
    MomentState st;
    st.n = ws[3 * b];
    st.mean = ws[3 * b + 1];
    st.m2 = ws[3 * b + 2];
    tot = moments_merge(tot, st);
  }
  double mean, scale;
  whiten_coeffs(tot, &mean, &scale);
  ws[3 * B] = mean;
  ws[3 * B + 1] = scale;
}

template <typename acc_t, typename M>
__global__ void whiten_kernel(acc_t* out, const void* mask, int64_t B, int64_t T, int64_t mask_stride,
                              const double* ws) {
  const int64_t total = B * T;
  const double mean = ws[3 * B], scale = ws[3 * B + 1];
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / T, t = i - b * T;
    if (is_valid(static_cast<const M*>(mask) + b * mask_stride, t)) {
      out[i] = acc_t(whiten_value(double(out[i]), mean, scale));
    }
  }
}

template <typename T, typename M>
__global__ void prefix_kernel(ScanParams<T> p) {
  using acc_t = typename Acc<T>::type;
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= p.B) return;
  const T* x = p.x + b * p.x_stride;
  const M* m = static_cast<const M*>(p.mask) + b * p.mask_stride;
  acc_t* out = p.out + b * p.T;
  acc_t s = acc_t(0);
  for (int64_t t = 0; t < p.T; ++t) {
    const bool ok = is_valid(m, t);
    const acc_t n = s + upcast(x[t]);
    out[t] = ok ? n : acc_t(0);
    s = ok ? n : s;
  }
}

template <typename T> ScanParams<T> params(const ScanArgs& a) {
  using acc_t = typename Acc<T>::type;
  ScanParams<T> p;
  p.x = static_cast<const T*>(a.x);
  p.values = static_cast<const T*>(a.values);
  p.mask = a.mask;
  p.bootstrap = static_cast<const acc_t*>(a.bootstrap);
  p.B = a.B;
  p.T = a.T;
  p.x_stride = a.x_stride;
  p.values_stride = a.values_stride;
  p.mask_stride = a.mask_stride;
  p.gamma = acc_t(a.gamma);
  p.decay = acc_t(a.gamma * a.lam);
  p.out = static_cast<acc_t*>(a.out);
  p.returns = static_cast<acc_t*>(a.returns);
  p.workspace = (a.values && a.whiten) ? static_cast<double*>(a.workspace) : nullptr;
  return p;
}

unsigned row_blocks(int64_t B) { return unsigned((B + kThreads - 1) / kThreads); }

template <typename T, typename M> struct ReverseOp {
  static void run(const ScanArgs& a, cudaStream_t s) {
    using acc_t = typename Acc<T>::type;
    const ScanParams<T> p = params<T>(a);
    if (a.values) reverse_kernel<T, M, true><<<row_blocks(a.B), kThreads, 0, s>>>(p);
    else reverse_kernel<T, M, false><<<row_blocks(a.B), kThreads, 0, s>>>(p);
    if (p.workspace) {
      merge_kernel<<<1, 1, 0, s>>>(p.workspace, a.B);
      const int64_t total = a.B * a.T;
      const int64_t want = (total + kWhitenThreads - 1) / kWhitenThreads;
      const unsigned grid = unsigned(want < 65535 ? want : 65535);
      whiten_kernel<acc_t, M><<<grid, kWhitenThreads, 0, s>>>(p.out, a.mask, a.B, a.T, a.mask_stride, p.workspace);
    }
  }
};

template <typename T, typename M> struct PrefixOp {
  static void run(const ScanArgs& a, cudaStream_t s) {
    prefix_kernel<T, M><<<row_blocks(a.B), kThreads, 0, s>>>(params<T>(a));
  }
};

template <template <typename, typename> class F> bool by_types(const ScanArgs& a, cudaStream_t s) {
  auto with_mask = [&](auto tag) -> bool {
    using T = decltype(tag);
    switch (a.mask_code) {
      case kMaskByte: F<T, uint8_t>::run(a, s); return true;
      case kMaskInt32: F<T, int32_t>::run(a, s); return true;
      case kMaskInt64: F<T, int64_t>::run(a, s); return true;
      case kMaskFloat32: F<T, float>::run(a, s); return true;
      case kMaskFloat64: F<T, double>::run(a, s); return true;
      default: return false;
    }
  };
  switch (a.dtype) {
    case kFloat32: return with_mask(float());
    case kBFloat16: return with_mask(bf16_t());
    case kFloat16: return with_mask(f16_t());
    case kFloat64: return with_mask(double());
    default: return false;
  }
}

template <template <typename, typename> class F> const char* launch(const ScanArgs& a, uintptr_t stream) {
  if (a.B <= 0 || a.T <= 0) return nullptr;
  if (!by_types<F>(a, reinterpret_cast<cudaStream_t>(stream))) return "unsupported dtype or mask code";
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* reverse_scan(const ScanArgs& a, uintptr_t stream) { return launch<ReverseOp>(a, stream); }
const char* prefix_sum(const ScanArgs& a, uintptr_t stream) { return launch<PrefixOp>(a, stream); }

}  // namespace cuda
}  // namespace fusedrl

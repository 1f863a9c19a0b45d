// Masked scans along T on the CPU: GAE (with the truncated-response bootstrap and optional
// whitening), discounted returns and prefix sums, with the per-step math of fusedrl/scan.h.
//
// Each row's scan is a sequential recurrence, so rows are the parallel dimension: OpenMP threads
// take blocks of kRows consecutive rows (block boundaries at fixed multiples of kRows, the same for
// any thread count), and each block walks T once with its kRows independent carries interleaved,
// which hides the latency of the carry chain. Masked tokens are never used (their values only
// reach selects), so NaN padding is harmless. No ISA variants: the work is latency-bound, not
// vector-bound, and one baseline build keeps every row's arithmetic identical (no FMA contraction
// in one variant and not another), hence bitwise-identical results under any thread count.
//
// Whitening: each row's (count, mean, M2) over its valid advantages is taken in double right after
// the row's scan (the row is still in cache), written to the workspace, merged in row order by one
// thread (moments_merge), and the advantages are then rescaled in place.
#include "cpu/scan.h"

#include <algorithm>
#include <cmath>
#include <omp.h>

#include "fusedrl/scan.h"

namespace fusedrl {
namespace cpu {
namespace {

constexpr int kRows = 4;  // rows scanned together

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

FUSEDRL_HD float load(const float* p, int64_t i) { return p[i]; }
FUSEDRL_HD double load(const double* p, int64_t i) { return p[i]; }
FUSEDRL_HD float load(const bf16_t* p, int64_t i) { return to_float(p[i]); }
FUSEDRL_HD float load(const f16_t* p, int64_t i) { return to_float(p[i]); }

template <typename M> FUSEDRL_HD bool is_valid(const M* p, int64_t i) { return p[i] != M(0); }

// The reverse scan of rows [b0, b0 + R): GAE when HAS_V, discounted returns otherwise.
template <typename T, typename M, bool HAS_V, int R>
void reverse_block(const ScanArgs& a, int64_t b0) {
  using acc_t = typename Acc<T>::type;
  const acc_t gamma = acc_t(a.gamma);
  const acc_t decay = acc_t(a.gamma * a.lam);
  const acc_t* boot = static_cast<const acc_t*>(a.bootstrap);
  const T* x[R];
  const T* v[R];
  const M* m[R];
  acc_t* out[R];
  acc_t* ret[R];
  acc_t c[R], vn[R];
  for (int j = 0; j < R; ++j) {
    const int64_t b = b0 + j;
    x[j] = static_cast<const T*>(a.x) + b * a.x_stride;
    v[j] = HAS_V ? static_cast<const T*>(a.values) + b * a.values_stride : nullptr;
    m[j] = static_cast<const M*>(a.mask) + b * a.mask_stride;
    out[j] = static_cast<acc_t*>(a.out) + b * a.T;
    ret[j] = HAS_V ? static_cast<acc_t*>(a.returns) + b * a.T : nullptr;
    c[j] = acc_t(0);
    vn[j] = (HAS_V && boot) ? boot[b] : acc_t(0);
  }
  for (int64_t t = a.T - 1; t >= 0; --t) {
    for (int j = 0; j < R; ++j) {
      const bool ok = is_valid(m[j], t);
      const acc_t r = load(x[j], t);
      if (HAS_V) {
        const acc_t val = load(v[j], t);
        const acc_t s = scan_step(gae_delta(r, val, vn[j], gamma), c[j], decay);
        out[j][t] = ok ? s : acc_t(0);
        ret[j][t] = ok ? s + val : acc_t(0);
        c[j] = ok ? s : c[j];
        vn[j] = ok ? val : vn[j];
      } else {
        const acc_t s = scan_step(r, c[j], decay);
        out[j][t] = ok ? s : acc_t(0);
        c[j] = ok ? s : c[j];
      }
    }
  }
}

// Row b's whitening moments over its valid outputs, in double.
template <typename T, typename M> MomentState row_moments(const ScanArgs& a, int64_t b) {
  using acc_t = typename Acc<T>::type;
  const acc_t* o = static_cast<const acc_t*>(a.out) + b * a.T;
  const M* m = static_cast<const M*>(a.mask) + b * a.mask_stride;
  double n = 0.0, sum = 0.0;
  for (int64_t t = 0; t < a.T; ++t) {
    const bool ok = is_valid(m, t);
    n += ok ? 1.0 : 0.0;
    sum += ok ? double(o[t]) : 0.0;
  }
  MomentState st = moments_empty();
  if (n == 0.0) return st;
  const double mean = sum / n;
  double m2 = 0.0;
  for (int64_t t = 0; t < a.T; ++t) {
    const double d = double(o[t]) - mean;
    m2 += is_valid(m, t) ? d * d : 0.0;
  }
  st.n = n;
  st.mean = mean;
  st.m2 = m2;
  return st;
}

template <typename T, typename M> void whiten_row(const ScanArgs& a, int64_t b, double mean, double scale) {
  using acc_t = typename Acc<T>::type;
  acc_t* o = static_cast<acc_t*>(a.out) + b * a.T;
  const M* m = static_cast<const M*>(a.mask) + b * a.mask_stride;
  for (int64_t t = 0; t < a.T; ++t) {
    const acc_t w = acc_t(whiten_value(double(o[t]), mean, scale));
    o[t] = is_valid(m, t) ? w : o[t];  // masked tokens stay 0
  }
}

// The prefix sum of rows [b0, b0 + R).
template <typename T, typename M, int R> void prefix_block(const ScanArgs& a, int64_t b0) {
  using acc_t = typename Acc<T>::type;
  const T* x[R];
  const M* m[R];
  acc_t* out[R];
  acc_t s[R];
  for (int j = 0; j < R; ++j) {
    const int64_t b = b0 + j;
    x[j] = static_cast<const T*>(a.x) + b * a.x_stride;
    m[j] = static_cast<const M*>(a.mask) + b * a.mask_stride;
    out[j] = static_cast<acc_t*>(a.out) + b * a.T;
    s[j] = acc_t(0);
  }
  for (int64_t t = 0; t < a.T; ++t) {
    for (int j = 0; j < R; ++j) {
      const bool ok = is_valid(m[j], t);
      const acc_t n = s[j] + load(x[j], t);
      out[j][t] = ok ? n : acc_t(0);
      s[j] = ok ? n : s[j];
    }
  }
}

int threads_for(const ScanArgs& a, int64_t blocks) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(a.num_threads, blocks)));
}

template <typename T, typename M, bool HAS_V> void run_reverse(const ScanArgs& a) {
  const int64_t B = a.B;
  const int64_t blocks = (B + kRows - 1) / kRows;
  const bool whiten = HAS_V && a.whiten;
  double* ws = static_cast<double*>(a.workspace);
  double mean = 0.0, scale = 1.0;
#pragma omp parallel num_threads(threads_for(a, blocks))
  {
#pragma omp for schedule(static)
    for (int64_t k = 0; k < blocks; ++k) {
      const int64_t b0 = k * kRows;
      if (b0 + kRows <= B) {
        reverse_block<T, M, HAS_V, kRows>(a, b0);
      } else {
        for (int64_t b = b0; b < B; ++b) reverse_block<T, M, HAS_V, 1>(a, b);
      }
      if (whiten) {
        for (int64_t b = b0; b < std::min(b0 + kRows, B); ++b) {
          const MomentState st = row_moments<T, M>(a, b);
          ws[3 * b] = st.n;
          ws[3 * b + 1] = st.mean;
          ws[3 * b + 2] = st.m2;
        }
      }
    }
    if (whiten) {
      // implicit barrier after the omp for; one thread merges the rows in index order
#pragma omp single
      {
        MomentState tot = moments_empty();
        for (int64_t b = 0; b < B; ++b) {
          MomentState st;
          st.n = ws[3 * b];
          st.mean = ws[3 * b + 1];
          st.m2 = ws[3 * b + 2];
          tot = moments_merge(tot, st);
        }
        whiten_coeffs(tot, &mean, &scale);
      }
      // implicit barrier after single: mean and scale are visible to every thread
#pragma omp for schedule(static)
      for (int64_t b = 0; b < B; ++b) whiten_row<T, M>(a, b, mean, scale);
    }
  }
}

template <typename T, typename M> void run_prefix(const ScanArgs& a) {
  const int64_t B = a.B;
  const int64_t blocks = (B + kRows - 1) / kRows;
#pragma omp parallel for schedule(static) num_threads(threads_for(a, blocks))
  for (int64_t k = 0; k < blocks; ++k) {
    const int64_t b0 = k * kRows;
    if (b0 + kRows <= B) {
      prefix_block<T, M, kRows>(a, b0);
    } else {
      for (int64_t b = b0; b < B; ++b) prefix_block<T, M, 1>(a, b);
    }
  }
}

// Calls F<T, M>::run(a) for the dtype and mask codes; false for an unknown code.
template <template <typename, typename> class F> bool by_types(const ScanArgs& a) {
  auto with_mask = [&](auto tag) -> bool {
    using T = decltype(tag);
    switch (a.mask_code) {
      case kMaskByte: F<T, uint8_t>::run(a); return true;
      case kMaskInt32: F<T, int32_t>::run(a); return true;
      case kMaskInt64: F<T, int64_t>::run(a); return true;
      case kMaskFloat32: F<T, float>::run(a); return true;
      case kMaskFloat64: F<T, double>::run(a); return true;
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

template <typename T, typename M> struct ReverseOp {
  static void run(const ScanArgs& a) {
    if (a.values) run_reverse<T, M, true>(a);
    else run_reverse<T, M, false>(a);
  }
};
template <typename T, typename M> struct PrefixOp {
  static void run(const ScanArgs& a) { run_prefix<T, M>(a); }
};

}  // namespace

bool reverse_scan(const ScanArgs& a) {
  if (a.B <= 0 || a.T <= 0) return a.dtype >= 0 && a.dtype <= 3;
  return by_types<ReverseOp>(a);
}

bool prefix_sum(const ScanArgs& a) {
  if (a.B <= 0 || a.T <= 0) return a.dtype >= 0 && a.dtype <= 3;
  return by_types<PrefixOp>(a);
}

}  // namespace cpu
}  // namespace fusedrl

// The clipped value loss on the CPU: per-token loss, aggregation, metrics and d loss / d values in
// one pass over the tokens. Per-token math: fusedrl/value.h.
//
// Rows (sequences) are spread over OpenMP threads; a row is walked in tiles of kTile tokens. Each
// tile's operands are converted to the accumulation type A (float; double for float64 values) and
// cleaned to 0 on padded tokens, then one simd loop computes every token and the tile's sums, which
// are added to the row's in double in token order (results do not depend on the thread count).
// A tile that is all padding is not computed (its gradient is zero). The loads and stores are those
// of csrc/cpu/policy.cpp (same View layout and dtype codes).
#include "fusedrl/value_args.h"

#include <omp.h>

#include <algorithm>

#include "cpu/isa.h"

namespace fusedrl {
namespace cpu {
namespace {

using namespace ::fusedrl::value;

constexpr int64_t kTile = 256;
template <typename A> struct Tile {
  A m[kTile], v[kTile], o[kTile], r[kTile], g[kTile];
};

template <typename A> FUSEDRL_HD void clean(const View& view, int64_t i, int64_t start, int64_t t0, int64_t n,
                                            const A* m, A* out) {
  load(view, i, start, t0, n, out);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = m[j] != A(0) ? out[j] : A(0);
}

template <typename A> FUSEDRL_HD void value_rows(const ValueArgs& a, int64_t r0, int64_t r1) {
  Tile<A> T;
  const A c = A(a.opt.clip), ties = a.opt.verl_ties ? A(1) : A(0);
  const bool want_g = a.grad.p != nullptr;
  for (int64_t i = r0; i < r1; ++i) {
    int64_t start = 0, len = a.T;
    if (a.cu_seqlens) {
      start = a.cu_seqlens[i];
      len = a.cu_seqlens[i + 1] - start;
    }
    const A g = A(a.coef[i]);
    double s_loss = 0, cnt = 0, c_clip = 0, s_v = 0;
    for (int64_t t0 = 0; t0 < len; t0 += kTile) {
      const int64_t n = std::min(kTile, len - t0);
      load(a.mask, i, start, t0, n, T.m);
      int any = 0;
#pragma omp simd reduction(| : any)
      for (int64_t j = 0; j < n; ++j) any |= T.m[j] != A(0) ? 1 : 0;
      if (!any) {  // all padding: zero gradients, nothing to sum
        if (want_g) {
          std::fill(T.g, T.g + n, A(0));
          store(a.grad, i, start, t0, n, T.g);
        }
        continue;
      }
      clean(a.values, i, start, t0, n, T.m, T.v);
      if (a.old_values.p) clean(a.old_values, i, start, t0, n, T.m, T.o);
      else std::copy(T.v, T.v + n, T.o);
      clean(a.returns, i, start, t0, n, T.m, T.r);
      A t_loss = 0, t_cnt = 0, t_clip = 0, t_v = 0;
#pragma omp simd reduction(+ : t_loss, t_cnt, t_clip, t_v)
      for (int64_t j = 0; j < n; ++j) {
        const A m = T.m[j];
        A dv, clipped;
        const A l = token_loss(T.v[j], T.o[j], T.r[j], c, ties, &dv, &clipped);
        T.g[j] = m != A(0) ? g * m * dv : A(0);
        t_loss += m * l;
        t_cnt += m;
        t_clip += m * clipped;
        t_v += m * T.v[j];
      }
      s_loss += double(t_loss), cnt += double(t_cnt), c_clip += double(t_clip), s_v += double(t_v);
      if (want_g) store(a.grad, i, start, t0, n, T.g);
    }
    double* out = a.rows + i * kNumOutputs;
    out[kLoss] = double(g) * s_loss;
    out[kOutCount] = cnt;
    out[kClipped] = c_clip;
    out[kValue] = s_v;
  }
}

FUSEDRL_ISA_VARIANTS(value_f32, ValueArgs, value_rows, float)
FUSEDRL_ISA_VARIANTS(value_f64, ValueArgs, value_rows, double)
#undef FUSEDRL_ISA_VARIANTS

}  // namespace

bool value_loss(const ValueArgs& a) {
  if (a.values.dtype < kFloat32 || a.values.dtype > kFloat64) return false;
  auto fn = a.values.dtype == kFloat64 ? value_f64() : nullptr;
  auto fn32 = a.values.dtype == kFloat64 ? nullptr : value_f32();
  const int nt = int(std::max<int64_t>(1, std::min<int64_t>(a.num_threads, a.B)));
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t i = 0; i < a.B; ++i) {
    if (fn) fn(a, i, i + 1);
    else fn32(a, i, i + 1);
  }
  return true;
}

}  // namespace cpu
}  // namespace fusedrl

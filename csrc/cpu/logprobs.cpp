// Token log-probs and entropy from logits on the CPU: one pass over V per row for the forward
// (online log-sum-exp), one pass per row for the backward (recomputed from the saved row max and log-normalizer).
// Rows are spread over OpenMP threads; within a row, V is walked in chunks that fit in L1, each
// chunk in two vectorizable loops (max, then the sums). The per-element math is
// fusedrl/logprobs.h, shared with the CUDA kernel.
#include "fusedrl/logprobs_args.h"
#include "cpu/isa.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <omp.h>

#include "fusedrl/logprobs.h"

namespace fusedrl {
namespace cpu {
namespace {

constexpr int64_t kChunk = 2048;

// Accumulation type: fp32 for fp32/bf16/fp16 inputs, fp64 for fp64 inputs.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename T> FUSEDRL_HD typename Acc<T>::type load(const T* p, int64_t i);
template <> FUSEDRL_HD float load<float>(const float* p, int64_t i) { return p[i]; }
template <> FUSEDRL_HD double load<double>(const double* p, int64_t i) { return p[i]; }
template <> FUSEDRL_HD float load<bf16_t>(const bf16_t* p, int64_t i) { return to_float(p[i]); }
template <> FUSEDRL_HD float load<f16_t>(const f16_t* p, int64_t i) { return to_float(p[i]); }

template <typename T> FUSEDRL_HD void store(T* p, int64_t i, typename Acc<T>::type v);
template <> FUSEDRL_HD void store<float>(float* p, int64_t i, float v) { p[i] = v; }
template <> FUSEDRL_HD void store<double>(double* p, int64_t i, double v) { p[i] = v; }
template <> FUSEDRL_HD void store<bf16_t>(bf16_t* p, int64_t i, float v) { p[i] = from_float<bf16_t>(v); }
template <> FUSEDRL_HD void store<f16_t>(f16_t* p, int64_t i, float v) { p[i] = from_float<f16_t>(v); }

// The label's scaled logit, rounded on its own: the build contracts a * b - c into FMAs, and a
// call it cannot inline is the portable way to keep this product out of the following x - max,
// so that x - max is exact (the label at the max gives log p = -log s exactly, as in torch).
template <typename T>
__attribute__((noinline)) typename Acc<T>::type label_logit(const T* z, int64_t label,
                                                            typename Acc<T>::type inv_temp) {
  return mul_rn(load(z, label), inv_temp);
}

// One row's softmax statistics. Returns false when the row holds a NaN.
template <typename T>
FUSEDRL_HD bool row_stats(const T* z, int64_t V, typename Acc<T>::type inv_temp,
                          bool want_entropy, LseState<typename Acc<T>::type>* out) {
  using acc_t = typename Acc<T>::type;
  acc_t buf[kChunk];
  LseState<acc_t> st = lse_empty<acc_t>();
  double s_tot = 0.0, t_tot = 0.0;  // chunk partial sums are added in double across chunks
  int nan_seen = 0;
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int64_t n = std::min(kChunk, V - c0);
    acc_t cmax = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : cmax) reduction(| : nan_seen)
    for (int64_t i = 0; i < n; ++i) {
      const acc_t x = mul_rn(load(z, c0 + i), inv_temp);
      buf[i] = x;
      nan_seen |= (x != x);
      cmax = x > cmax ? x : cmax;
    }
    if (cmax == -std::numeric_limits<acc_t>::infinity()) continue;  // all -inf: adds nothing
    if (cmax > st.m) {
      st.s = acc_t(s_tot);
      st.t = acc_t(t_tot);
      st = lse_rebase(st, cmax);
      s_tot = st.s;
      t_tot = st.t;
    }
    const acc_t m = st.m;
    acc_t s = 0, t = 0;
    if (want_entropy) {
#pragma omp simd reduction(+ : s, t)
      for (int64_t i = 0; i < n; ++i) {
        const acc_t d = clamp_shift(buf[i] - m);
        const acc_t e = exp_nonpos(d);
        s += e;
        t += e * d;
      }
    } else {
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < n; ++i) s += exp_nonpos(clamp_shift(buf[i] - m));
    }
    s_tot += s;
    t_tot += t;
  }
  st.s = acc_t(s_tot);
  st.t = acc_t(t_tot);
  *out = st;
  return nan_seen == 0;
}

template <typename T>
FUSEDRL_HD void fwd_rows(const LogprobArgs& a, int64_t r0, int64_t r1) {
  using acc_t = typename Acc<T>::type;
  using out_t = acc_t;  // fp32 outputs, fp64 for fp64 logits
  const T* logits = static_cast<const T*>(a.logits);
  out_t* logp = static_cast<out_t*>(a.logp);
  out_t* ent = static_cast<out_t*>(a.entropy);
  out_t* max_out = static_cast<out_t*>(a.row_max);
  out_t* norm_out = static_cast<out_t*>(a.log_norm);
  const acc_t inv_temp = acc_t(a.inv_temp);
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t label = a.labels[r];
    if (label == a.ignore_index) {
      logp[r] = 0;
      if (ent) ent[r] = 0;
      max_out[r] = 0;
      norm_out[r] = 0;
      continue;
    }
    const T* z = logits + r * a.row_stride;
    LseState<acc_t> st;
    const bool finite = row_stats(z, a.V, inv_temp, ent != nullptr, &st);
    const acc_t log_norm = finite ? log_norm_value(st) : nan;
    max_out[r] = st.m;
    norm_out[r] = log_norm;
    logp[r] = logprob_value(label_logit(z, label, inv_temp), st.m, log_norm);
    if (ent) ent[r] = finite ? entropy_value(st) : nan;
  }
}

template <typename T>
FUSEDRL_HD void bwd_rows(const LogprobArgs& a, int64_t r0, int64_t r1) {
  using acc_t = typename Acc<T>::type;
  const T* logits = static_cast<const T*>(a.logits);
  const acc_t* max_in = static_cast<const acc_t*>(a.row_max);
  const acc_t* norm_in = static_cast<const acc_t*>(a.log_norm);
  const acc_t* ent_in = static_cast<const acc_t*>(a.entropy);
  const acc_t* g_lp_in = static_cast<const acc_t*>(a.grad_logp);
  const acc_t* g_h_in = static_cast<const acc_t*>(a.grad_entropy);
  T* grad = static_cast<T*>(a.grad_logits);
  const acc_t inv_temp = acc_t(a.inv_temp);
  for (int64_t r = r0; r < r1; ++r) {
    T* g = grad + r * a.grad_row_stride;
    const int64_t label = a.labels[r];
    const acc_t g_lp = g_lp_in ? g_lp_in[r] : acc_t(0);
    const acc_t g_h = g_h_in ? g_h_in[r] : acc_t(0);
    if (label == a.ignore_index || (g_lp == acc_t(0) && g_h == acc_t(0))) {
      for (int64_t v = 0; v < a.V; ++v) store(g, v, acc_t(0));
      continue;
    }
    const T* z = logits + r * a.row_stride;
    const acc_t m = max_in[r], log_norm = norm_in[r];
    const acc_t h = ent_in ? ent_in[r] : acc_t(0);
    // The label's gradient is formed before the row is written, so grad_logits may be the logits
    // buffer itself (the fused linear path writes d logits over the chunk's logits in place).
    const acc_t g_label = logprob_grad(label_logit(z, label, inv_temp), m, log_norm, h, true, g_lp, g_h, inv_temp);
    // x = z / T is rounded into a buffer by one loop and read by the next, as in row_stats: in a
    // single loop -ffp-contract=fast fuses z * (1/T) - m into an FMA, and the row's max entry then
    // got x - m = -1 ulp of x instead of 0 (a 1e-5 relative gradient error at |z / T| ~ 300).
    acc_t buf[kChunk];
    for (int64_t c0 = 0; c0 < a.V; c0 += kChunk) {
      const int64_t n = std::min(kChunk, a.V - c0);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) buf[i] = mul_rn(load(z, c0 + i), inv_temp);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        store(g, c0 + i, logprob_grad(buf[i], m, log_norm, h, false, g_lp, g_h, inv_temp));
      }
    }
    store(g, label, g_label);
  }
}

// Each row function in three ISA variants (csrc/cpu/isa.h); the OpenMP region stays outside them
// so the hot loops are compiled for the chosen ISA.
using RowsFn = void (*)(const LogprobArgs&, int64_t, int64_t);

FUSEDRL_ISA_VARIANTS(fwd_f32, LogprobArgs, fwd_rows, float)
FUSEDRL_ISA_VARIANTS(fwd_bf16, LogprobArgs, fwd_rows, bf16_t)
FUSEDRL_ISA_VARIANTS(fwd_f16, LogprobArgs, fwd_rows, f16_t)
FUSEDRL_ISA_VARIANTS(fwd_f64, LogprobArgs, fwd_rows, double)
FUSEDRL_ISA_VARIANTS(bwd_f32, LogprobArgs, bwd_rows, float)
FUSEDRL_ISA_VARIANTS(bwd_bf16, LogprobArgs, bwd_rows, bf16_t)
FUSEDRL_ISA_VARIANTS(bwd_f16, LogprobArgs, bwd_rows, f16_t)
FUSEDRL_ISA_VARIANTS(bwd_f64, LogprobArgs, bwd_rows, double)
#undef FUSEDRL_ISA_VARIANTS

void run_rows(RowsFn fn, const LogprobArgs& a) {
  const int64_t N = a.N;
  if (N <= 0) return;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(a.num_threads, N)));
#pragma omp parallel num_threads(nt)
  {
    const int64_t tid = omp_get_thread_num(), cnt = omp_get_num_threads();
    const int64_t r0 = N * tid / cnt, r1 = N * (tid + 1) / cnt;
    fn(a, r0, r1);
  }
}

RowsFn pick(int dtype, RowsFn f32, RowsFn bf16, RowsFn f16, RowsFn f64) {
  switch (dtype) {
    case kFloat32: return f32;
    case kBFloat16: return bf16;
    case kFloat16: return f16;
    case kFloat64: return f64;
    default: return nullptr;
  }
}

// Resolved once, at the first call.
const RowsFn kForward[4] = {fwd_f32(), fwd_bf16(), fwd_f16(), fwd_f64()};
const RowsFn kBackward[4] = {bwd_f32(), bwd_bf16(), bwd_f16(), bwd_f64()};

}  // namespace

bool logprobs_forward(const LogprobArgs& a) {
  RowsFn fn = pick(a.dtype, kForward[0], kForward[1], kForward[2], kForward[3]);
  if (!fn) return false;
  run_rows(fn, a);
  return true;
}

bool logprobs_backward(const LogprobArgs& a) {
  RowsFn fn = pick(a.dtype, kBackward[0], kBackward[1], kBackward[2], kBackward[3]);
  if (!fn) return false;
  run_rows(fn, a);
  return true;
}

}  // namespace cpu
}  // namespace fusedrl

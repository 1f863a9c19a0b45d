// Token log-probs and entropy from logits: the per-element math, shared by the C++ CPU kernel
// (csrc/cpu/logprobs.cpp) and the CUDA kernel (csrc/cuda/logprobs.cu). The Triton kernel
// (python/fusedrl/kernels/logprobs.py) mirrors these functions line for line.
//
// With x_v = z_v / T (temperature T), a row's softmax statistics are kept as a running state
//   m = max_v x_v,   s = sum_v exp(x_v - m),   t = sum_v exp(x_v - m) (x_v - m)
// so that   lse = m + log s   and   H = -sum_v p_v log p_v = lse - E_p[x] = log s - t / s.
// Keeping t relative to the max (not sum p x) avoids the cancellation of lse - E[x] when the
// entropy is small. A row's result is saved as the pair (m, log s), never as lse = m + log s:
// with large logits (|x| ~ 1e4) the sum would round away the digits of log s, so every log-prob
// is formed as (x - m) - log s. The gradients (docs/OBJECTIVES.md, "Token log-probs"):
//   d logp / d z_v = (1[v = label] - p_v) / T,   d H / d z_v = -p_v (log p_v + H) / T,
// with 1 - p_label computed as -expm1(log p_label) (exact when p_label is close to 1).
#pragma once

#include "fusedrl/common.h"

namespace fusedrl {

// Shifts x - m are clamped below at this value before they multiply anything, so a logit of
// -inf (a masked vocabulary entry) contributes exp(-inf) * (-inf) = 0, not NaN. NaN passes.
template <typename acc_t> FUSEDRL_HD acc_t clamp_shift(acc_t d) {
  const acc_t lo = acc_t(-128);
  return d < lo ? lo : d;
}

template <typename acc_t> struct LseState {
  acc_t m;  // running max of x (-inf when empty)
  acc_t s;  // sum exp(x - m)
  acc_t t;  // sum exp(x - m) (x - m)
};

template <typename acc_t> FUSEDRL_HD LseState<acc_t> lse_empty() {
  LseState<acc_t> st;
  st.m = -INFINITY;
  st.s = acc_t(0);
  st.t = acc_t(0);
  return st;
}

// Re-expresses a state relative to a new max m_new >= st.m (an empty state stays empty).
template <typename acc_t> FUSEDRL_HD LseState<acc_t> lse_rebase(LseState<acc_t> st, acc_t m_new) {
  if (!(st.s > acc_t(0))) {  // empty: nothing to rescale
    LseState<acc_t> r;
    r.m = m_new;
    r.s = st.s;  // keeps a NaN
    r.t = st.t;
    return r;
  }
  const acc_t shift = clamp_shift(st.m - m_new);  // <= 0
  const acc_t a = exp_nonpos(shift);
  LseState<acc_t> r;
  r.m = m_new;
  r.s = st.s * a;
  r.t = a * (st.t + shift * st.s);
  return r;
}

// Merges two states (associative up to rounding; used across chunks, threads and warps).
template <typename acc_t> FUSEDRL_HD LseState<acc_t> lse_merge(LseState<acc_t> a, LseState<acc_t> b) {
  const acc_t m = a.m > b.m ? a.m : b.m;
  if (m == -INFINITY) {  // both empty (a NaN pushed into an empty state survives in s)
    a.s += b.s;
    a.t += b.t;
    return a;
  }
  const LseState<acc_t> ra = lse_rebase(a, m), rb = lse_rebase(b, m);
  LseState<acc_t> r;
  r.m = m;
  r.s = ra.s + rb.s;
  r.t = ra.t + rb.t;
  return r;
}

// Adds one element (the scalar online update used by the CUDA threads).
template <typename acc_t> FUSEDRL_HD LseState<acc_t> lse_push(LseState<acc_t> st, acc_t x) {
  if (x > st.m) st = lse_rebase(st, x);
  if (x == -INFINITY) return st;  // a masked entry adds exactly nothing
  const acc_t d = clamp_shift(x - st.m);
  const acc_t e = exp_nonpos(d);
  st.s += e;
  st.t += e * d;
  return st;
}

// log s: the row's log-normalizer relative to its max (lse = m + log s).
template <typename acc_t> FUSEDRL_HD acc_t log_norm_value(const LseState<acc_t>& st) { return log_acc(st.s); }
template <typename acc_t> FUSEDRL_HD acc_t entropy_value(const LseState<acc_t>& st) {
  return log_acc(st.s) - st.t / st.s;
}

// log p_v = (x_v - m) - log s.
template <typename acc_t> FUSEDRL_HD acc_t logprob_value(acc_t x, acc_t m, acc_t log_norm) {
  return (x - m) - log_norm;
}

// Gradient of  g_lp * logp + g_h * H  w.r.t. the logit z_v, given x_v = z_v / T, the row's max m,
// log-normalizer log s and entropy H. Shared by the backward of every backend.
template <typename acc_t>
FUSEDRL_HD acc_t logprob_grad(acc_t x, acc_t m, acc_t log_norm, acc_t entropy, bool is_label,
                              acc_t g_lp, acc_t g_h, acc_t inv_temp) {
  const acc_t lp = clamp_shift(logprob_value(x, m, log_norm));  // p = 0 multiplies a finite value
  const acc_t p = exp_nonpos(lp);
  const acc_t onehot_minus_p = is_label ? -expm1_acc(lp) : -p;
  return inv_temp * (g_lp * onehot_minus_p - g_h * p * (lp + entropy));
}

}  // namespace fusedrl

// Per-token math of the fused policy objective (spec: python/fusedrl/reference/policy.py, kl.py),
// shared by csrc/cpu/policy.cpp (g++) and csrc/cuda/policy.cu (nvcc); python/fusedrl/kernels/policy.py (Triton)
// mirrors it function by function. Plain C++ on plain numbers, templated on the accumulation type
// A (float, or double for float64 log-probs).
//
// The objective is split so that one kernel serves every option:
//
//   L = sum_i sum_t m_it [ g_i q_it l_it + beta gk_i kl_it - entropy_coef ge_i H_it ]
//
// with l the surrogate, q the rollout-correction weight, kl the KL estimate (times w with the bias
// correction), H the entropy, and g / gk / ge the per-row aggregation coefficients of the loss,
// KL and entropy terms (python/fusedrl/reference/aggregate.py: row_coefficients, the one place
// where normalizers are written; gk = g and ge = g when the term is aggregated with the loss).
// Each token's surrogate depends on its ratio w (and clipped ratio wc); the ratio level says how w
// depends on the log-probs x:
//
//   token            w_t = exp(rho_t)                    local
//   sequence-token   w_t = exp(min(log s_i, 10))          local (the gradient of a token ratio)
//   sequence         w_t = s_i = exp(mean_t m rho)        one row sum:   dL/dx_t += m_t dL/ds s / n
//   hybrid           w_t = a_t w_tok + (1 - a_t) s_i      local + the row sum of the s part
//   cumulative       w_t = exp(c_t), c_t = sum_t'<=t m rho  a suffix sum: dL/dx_t = m_t sum_t'>=t dL/dc
//
// so a kernel computes, per token, dL/dw and dL/dwc (the partials through the unclipped and the
// clipped ratio) and dL/dx through the direct terms (CISPO, GPG, KL), then applies the level's
// chain rule. Row statistics (sums over the row's valid tokens) come from a first pass when the
// level, the surrogate or the aggregation needs them (RowStats).
//
// Ties follow torch's autograd: clamp passes the gradient at its bounds (inclusive); max / min of
// two equal values sends half the gradient to each; abs has gradient 0 at 0.
#pragma once

#include "fusedrl/common.h"
#include "fusedrl/view.h"

namespace fusedrl {
namespace policy {

// Option codes (python/fusedrl/ops/policy.py keeps the same tables).
enum Surrogate : int { kClip = 0, kCispo = 1, kSapo = 2, kGeoMean = 3, kReinforce = 4, kGpg = 5, kVespo = 6 };
enum Ratio : int { kToken = 0, kSequence = 1, kSequenceToken = 2, kCumulative = 3, kHybrid = 4 };
enum Kl : int { kK1 = 0, kAbs = 1, kK2 = 2, kK3 = 3, kLowVar = 4 };
enum Rollout : int {
  kNoRollout = -1, kTokenTruncate = 0, kTokenMask = 1, kSequenceTruncate = 2, kSequenceMask = 3, kIcepop = 4
};
// Mask codes: the float DType codes 0-3 (a per-token weight), then integer weights
// (fusedrl/view.h operand::MaskCode).
using operand::MaskCode;
using operand::kMaskByte;
using operand::kMaskInt32;
using operand::kMaskInt64;

// Row statistics of the first pass, in this order (float64 [B, kNumStats]).
// kSumVespo: sum m clamp(rho) (vespo); kSumOffKl: sum m (mu - x), mu the sampler's (else the old)
// log-probs (the off-policy sequence mask).
enum Stat : int {
  kCount = 0, kSumRho, kSumAdv, kSumGeo, kSumRollout, kSumLogQ, kMaxEntropy, kSumVespo, kSumOffKl, kNumStats
};
// Per-row outputs of the loss pass (float64 [B, kNumOutputs]): the row's share of the loss and the
// sums over its valid tokens of m times each metric.
enum Output : int {
  kLoss = 0, kOutCount, kClipLow, kClipHigh, kClipDual, kRatio, kKl, kEntropy, kRolloutWeight, kNumOutputs
};

// verl's bounds (reference: GSPO_TOKEN_LOG_RATIO_MAX, LOW_VAR_KL_*, GEO_MEAN_LOG_EPS).
constexpr double kGspoTokenLogMax = 10.0;
constexpr double kLowVarLogBound = 20.0;
constexpr double kLowVarValueBound = 10.0;
constexpr double kGeoMeanLogEps = 1e-10;
// TRL's vespo bounds (reference: VESPO_LOG_MIN = log(1e-8), VESPO_LOG_MAX, VESPO_LAMBDA_MIN).
constexpr double kVespoLogMin = -18.420680743952367;
constexpr double kVespoLogMax = 20.0;
constexpr double kVespoLambdaMin = 1e-4;

// Every non-tensor option, by name: the one list of them. The struct's members, the binding's
// reading (csrc/bindings/policy.cpp) and the name lists it reports to Python come from these two
// macros; python/fusedrl/ops/policy.py packs the values in this order by name and
// tests/test_policy_options.py fails when the Python, C++ and Triton names disagree. Integer options
// (codes and switches) come as int64, the others as double; absent optional values have their has_
// flag false.
#define FUSEDRL_POLICY_INT_OPTIONS(X)                                                                  \
  X(int, surrogate, kClip)          /* Surrogate code */                                             \
  X(int, ratio, kToken)             /* Ratio code */                                                 \
  X(int, kl, kK3)                   /* Kl code (the base kind of a "+" kind) */                      \
  X(int, rollout, kNoRollout)       /* Rollout code */                                               \
  X(bool, kl_straight, false)       /* the "+" kinds: value of kl, gradient of k2 */                 \
  X(bool, bias_kl, false)           /* kl *= w (TRL use_bias_correction_kl) */                       \
  X(bool, clip_below, true)         /* false for cispo_bounds="upper" */                             \
  X(bool, hybrid_entropy, false)    /* hybrid_mixing="entropy" */                                    \
  X(bool, has_dual, false)                                                                           \
  X(bool, has_delta, false)                                                                          \
  X(bool, has_cap, false)                                                                            \
  X(bool, has_cap_low, false)                                                                        \
  X(bool, has_clamp, true)                                                                           \
  X(bool, has_off_policy_mask, false)                                                                \
  X(bool, has_entropy_mask, false)
#define FUSEDRL_POLICY_FLOAT_OPTIONS(X)                                                                \
  X(double, lo, 0.8)                /* 1 - clip_low */                                               \
  X(double, hi, 1.2)                /* 1 + clip_high */                                              \
  X(double, seq_lo, 0.8)            /* hybrid's sequence branch */                                   \
  X(double, seq_hi, 1.2)                                                                             \
  X(double, log_lo, 0.0)            /* cumulative: log(1 - clip_low) */                              \
  X(double, log_hi, 0.0)            /* cumulative: log(1 + clip_high) */                             \
  X(double, geo_lo, 0.2)            /* geo_mean: clip of rho to [-clip_low, clip_high] */            \
  X(double, geo_hi, 0.2)                                                                             \
  X(double, dual, 3.0)                                                                               \
  X(double, delta, 0.0)                                                                              \
  X(double, beta, 0.0)                                                                               \
  X(double, entropy_coef, 0.0)                                                                       \
  X(double, cap, 3.0)                                                                                \
  X(double, cap_low, 0.0)                                                                            \
  X(double, clamp, 20.0)                                                                             \
  X(double, tau_pos, 1.0)                                                                            \
  X(double, tau_neg, 1.05)                                                                           \
  X(double, hybrid_alpha, 0.5)                                                                       \
  X(double, vespo_k_pos, 2.0)                                                                        \
  X(double, vespo_lambda_pos, 3.0)                                                                   \
  X(double, vespo_k_neg, 3.0)                                                                        \
  X(double, vespo_lambda_neg, 2.0)                                                                   \
  X(double, off_policy_threshold, 0.0)                                                               \
  X(double, entropy_threshold, 0.0)

struct Options {
#define FUSEDRL_OPTION_MEMBER(type, name, init) type name = init;
  FUSEDRL_POLICY_INT_OPTIONS(FUSEDRL_OPTION_MEMBER)
  FUSEDRL_POLICY_FLOAT_OPTIONS(FUSEDRL_OPTION_MEMBER)
#undef FUSEDRL_OPTION_MEMBER

  // Absent bounds as infinities (dual clip, delta, caps, the log-ratio clamp), so the per-token
  // math has no option tests; call once after filling the fields.
  void resolve() {
    if (!has_dual) dual = INFINITY;
    if (!has_delta) delta = INFINITY;
    if (!has_cap) cap = INFINITY;
    if (!has_cap_low) cap_low = -INFINITY;
    if (!has_clamp) clamp = INFINITY;
  }
};

// ---- elementary pieces ----

// exp of any argument: the vectorizable Cody-Waite + polynomial on the host, overflow to +inf
// above ~88.72 (float32), 0 below -87.3; NaN propagates.
FUSEDRL_HD float exp_any(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  const float lo = -87.3f, hi = 88.7f;
  const float xc = x < lo ? lo : (x > hi ? hi : x);
  const float n = exp_round(xc);
  const float p = exp_poly(xc, n);
  // 2^n as 2^(n - 1) * 2: n reaches 128 near the top of the range
  const float scale = bits_to_float(uint32_t(int32_t(n) + 126) << 23);
  const float v = p * scale * 2.0f;
  return x > 88.72283935546875f ? __builtin_inff() : (x < lo ? 0.0f : v);
#endif
}
FUSEDRL_HD double exp_any(double x) { return exp(x); }

// A token's gradient through its own ratio: dL/dw dw/dx + dL/dwc dwc/dx, where a zero partial
// contributes an exact zero even when the ratio's derivative is not a number (a NaN or overflowed
// log-ratio that the loss does not use, e.g. vespo's or a clipped token's): what the reference's
// autograd gives, where such a term is absent from the graph.
template <typename A> FUSEDRL_HD A through_ratio(A l_dw, A pw, A l_dwc, A pwc) {
  return (l_dw != A(0) ? l_dw * pw : A(0)) + (l_dwc != A(0) ? l_dwc * pwc : A(0));
}

// A row-coupled level's (sequence, hybrid) share of d loss / d x_t per unit of m_t: dL/ds ds/d(sum m
// rho) = dlds s s_pass / n; exactly 0 when no token's loss depends on s (dlds = 0), even if s is
// not a number.
template <typename A> FUSEDRL_HD A sequence_share(double dlds, A s, A s_pass, A count_div) {
  return dlds != 0.0 ? A(dlds) * s * s_pass / count_div : A(0);
}

// The log-weight clamp before every exp: (value, pass) with pass the clamp's gradient factor.
// (An absent bound is +inf: Options::resolve.)
template <typename A> FUSEDRL_HD A clamp_log(A v, const Options& o) { return clampv(v, A(-o.clamp), A(o.clamp)); }
template <typename A> FUSEDRL_HD A clamp_log_pass(A v, const Options& o) {
  return inside(v, A(-o.clamp), A(o.clamp));
}

// clip(w) to [lo, hi] (or only w <= hi when clip_below is false) and its derivative in w. (No
// `below && ...` inside: a bool in the select stops GCC's vectorizer, so the bound is resolved first.)
template <typename A> FUSEDRL_HD A lower_bound(A lo, bool below) { return below ? lo : A(-INFINITY); }
template <typename A> FUSEDRL_HD A clip_ratio(A w, A lo, A hi, bool below) {
  const A l = lower_bound(lo, below);
  return w < l ? l : (w > hi ? hi : w);
}
template <typename A> FUSEDRL_HD A clip_ratio_pass(A w, A lo, A hi, bool below) {
  return inside(w, lower_bound(lo, below), hi);
}

// The clip flags of a token (reference: clipped_low / clipped_high): the clipped ratio is above the
// ratio with a negative advantage, or below it with a positive one. Products of 0/1 values: GCC
// vectorizes these, not the && of comparisons next to clip_ratio_pass in one loop (mixed-width masks).
template <typename A> FUSEDRL_HD A clipped_low(A w, A wc, A adv) {
  return (wc > w ? A(1) : A(0)) * (adv < A(0) ? A(1) : A(0));
}
template <typename A> FUSEDRL_HD A clipped_high(A w, A wc, A adv) {
  return (wc < w ? A(1) : A(0)) * (adv > A(0) ? A(1) : A(0));
}

// ---- surrogates: value and partials dl/dw (unclipped ratio), dl/dwc (clipped), dl/dx (direct) ----

// clip (PPO / GRPO / DAPO) with TRL's delta and verl's dual clip; also returns the dual-clip flag.
// EXTRA = false: the caller knows both are absent (delta, dual = +inf), and they cost nothing.
template <bool EXTRA = true, typename A>
FUSEDRL_HD A clip_surrogate(A w, A wc, A adv, const Options& o, A* dw, A* dwc, A* dual_hit) {
  const A wu = EXTRA && w > A(o.delta) ? A(o.delta) : w;  // delta = +inf when absent
  const A dwu = !EXTRA || w <= A(o.delta) ? A(1) : A(0);
  const A a1 = -adv * wu, a2 = -adv * wc;
  const A l = max_nan(a1, a2);
  const A f1 = dmax_a(a1, a2), f2 = A(1) - f1;
  if (!EXTRA) {
    *dw = f1 * (-adv);
    *dwc = f2 * (-adv);
    *dual_hit = A(0);
    return l;
  }
  // dual clip, A < 0 only: min(l, -A dual); dual = +inf when absent (Options::resolve), so no
  // option test (a bool in the select stops GCC's vectorizer) and l, fd = 1, no hit.
  const bool neg = adv < A(0);
  const A c = -adv * A(o.dual);  // NaN at A = 0, never selected
  const A fd = neg ? dmin_a(l, c) : A(1);
  const A unclipped_max = (-adv * w > a2) ? -adv * w : a2;  // the reference flags with w, not min(w, delta)
  *dw = fd * f1 * (-adv) * dwu;
  *dwc = fd * f2 * (-adv);
  *dual_hit = (neg ? A(1) : A(0)) * (c < unclipped_max ? A(1) : A(0));
  return neg ? min_nan(l, c) : l;
}

// SAPO: -(4 / tau) sigmoid(tau (w - 1)) A; dl/dw = -4 A sig (1 - sig).
template <typename A> FUSEDRL_HD A sapo_surrogate(A w, A adv, const Options& o, A* dw) {
  const A tau = adv > A(0) ? A(o.tau_pos) : A(o.tau_neg);
  const A sig = A(1) / (A(1) + exp_any(-tau * (w - A(1))));
  *dw = -A(4) * adv * sig * (A(1) - sig);
  return -(sig * A(4) / tau) * adv;
}

// VESPO's gamma weight of a token (no gradient): exp(lambda + k log W - lambda W) with the row's
// sequence weight W = exp(log_w) and (k, lambda) by the sign of A; non-finite -> 0 (TRL's nan_to_num).
template <typename A> FUSEDRL_HD A vespo_phi(A adv, A log_w, A w, const Options& o) {
  const bool nonneg = adv >= A(0);
  const A k = nonneg ? A(o.vespo_k_pos) : A(o.vespo_k_neg);
  const A lam0 = nonneg ? A(o.vespo_lambda_pos) : A(o.vespo_lambda_neg);
  const A lam = lam0 > A(kVespoLambdaMin) ? lam0 : A(kVespoLambdaMin);
  const A phi = exp_any(lam + k * log_w - lam * w);
  return (phi == phi && phi < A(INFINITY)) ? phi : A(0);
}

// The masks on the surrogate (1 keeps the token): the off-policy sequence mask keeps A >= 0 or a row
// whose mean sg(mu - x) is at most the threshold; the entropy mask keeps H >= its threshold.
template <typename A> FUSEDRL_HD A off_policy_keep(A adv, A row_off_kl, const Options& o) {
  return (adv >= A(0) || row_off_kl <= A(o.off_policy_threshold)) ? A(1) : A(0);
}
template <typename A> FUSEDRL_HD A entropy_keep(A h, const Options& o) {
  return h >= A(o.entropy_threshold) ? A(1) : A(0);
}
template <typename A> FUSEDRL_HD A token_keep(A adv, A h, A row_off_kl, const Options& o) {
  return (o.has_off_policy_mask ? off_policy_keep(adv, row_off_kl, o) : A(1)) *
         (o.has_entropy_mask ? entropy_keep(h, o) : A(1));
}

// ---- rollout correction: the token weight from d = o - mu (or the row's sum for sequence modes) ----
// *_truncate clamps q = exp(d) to [cap_low, cap]; *_mask and icepop keep q inside it, else 0.
// Absent caps are +inf / -inf (Options::resolve).
template <typename A> FUSEDRL_HD A rollout_truncate(A d, const Options& o) {
  return clampv(exp_any(clamp_log(d, o)), A(o.cap_low), A(o.cap));
}
template <typename A> FUSEDRL_HD A rollout_mask(A d, const Options& o) {
  const A q = exp_any(clamp_log(d, o));
  return (q >= A(o.cap_low) && q <= A(o.cap)) ? q : A(0);
}
template <typename A> FUSEDRL_HD A rollout_weight(A d, const Options& o) {
  const bool truncate = o.rollout == kTokenTruncate || o.rollout == kSequenceTruncate;
  return truncate ? rollout_truncate(d, o) : rollout_mask(d, o);
}

// ---- KL estimators of diff = x - r: value of the kind KIND, derivative (k2's for the "+" kinds) ----
// KIND is a template argument, as in Triton (kl_terms dispatches on the runtime code): a switch left
// inside the loop's inlined code keeps the derivative in memory and stops GCC's vectorizer.
template <int KIND, typename A> FUSEDRL_HD A kl_value(A diff, A* deriv) {
  if constexpr (KIND == kK1) {
    *deriv = A(1);
    return diff;
  } else if constexpr (KIND == kAbs) {
    *deriv = diff > A(0) ? A(1) : (diff < A(0) ? A(-1) : A(0));
    return diff < A(0) ? -diff : diff;
  } else if constexpr (KIND == kK2) {
    *deriv = diff;
    return A(0.5) * diff * diff;
  } else if constexpr (KIND == kK3) {
    const A d = -diff;
    const A e = exp_any(d);
    *deriv = A(1) - e;
    return e - d - A(1);
  } else {  // low_var_kl
    const A d0 = -diff;
    const A d = clampv(d0, A(-kLowVarLogBound), A(kLowVarLogBound));
    const A e = exp_any(d);
    const A v0 = e - d - A(1);
    const A v = clampv(v0, A(-kLowVarValueBound), A(kLowVarValueBound));
    *deriv = (A(1) - e) * inside(d0, A(-kLowVarLogBound), A(kLowVarLogBound)) *
             inside(v0, A(-kLowVarValueBound), A(kLowVarValueBound));
    return v;
  }
}

// ---- geo_mean (GMPO): the sign-aware clipped log-ratio, its derivative in rho and clip flag ----
template <typename A> FUSEDRL_HD A geo_log_ratio(A rho, A adv, const Options& o, A* drho, A* clipped) {
  const A rc = clampv(rho, A(-o.geo_lo), A(o.geo_hi));
  *clipped = rho != rc ? A(1) : A(0);
  if (adv > A(0)) {
    *drho = rho <= A(o.geo_hi) ? A(1) : A(0);
    return rho < rc ? rho : rc;
  }
  if (adv < A(0)) {
    *drho = rho >= A(-o.geo_lo) ? A(1) : A(0);
    return rho > rc ? rho : rc;
  }
  *drho = A(0);
  return A(0);
}

// ---- per-row quantities from the row statistics (the first pass) ----
template <typename A> struct Row {
  A count_div;   // max(n, 1) semantics: n if n > 0 else 1
  A s, s_pass;   // sequence ratio s_i and its clamp's gradient factor
  A log_s;       // unclamped mean log-ratio (sequence-token)
  A adv_mean;    // geo_mean: the row's mean advantage
  A geo, geo_pass;  // geo_mean: exp(mean rho~) and its clamp factor
  A q_row;       // sequence rollout weight, or geo_mean's geometric mean of the token weights
  A h_max;       // hybrid entropy mixing
  A vespo_log_w, vespo_w;  // vespo: the clamped sequence log-weight and its exp
  A off_kl;      // the off-policy mask's row mean sg(mu - x)
};

// stats: the row's kNumStats values.
template <typename A> FUSEDRL_HD Row<A> row_quantities(const double* stats, const Options& o) {
  Row<A> r;
  const A n = A(stats[kCount]);
  r.count_div = n > A(0) ? n : A(1);
  r.log_s = A(stats[kSumRho]) / r.count_div;
  r.s = exp_any(clamp_log(r.log_s, o));
  r.s_pass = clamp_log_pass(r.log_s, o);
  r.adv_mean = A(stats[kSumAdv]) / r.count_div;
  const A geo_mean = A(stats[kSumGeo]) / r.count_div;
  r.geo = exp_any(clamp_log(geo_mean, o));
  r.geo_pass = clamp_log_pass(geo_mean, o);
  r.q_row = A(1);
  if (o.rollout == kSequenceTruncate || o.rollout == kSequenceMask) {
    const A q = rollout_weight(A(stats[kSumRollout]), o);
    // geo_mean takes the geometric mean of the (constant) token weights: exp(mean log(q + eps))
    r.q_row = o.surrogate == kGeoMean ? exp_any(log_acc(q + A(kGeoMeanLogEps)) * n / r.count_div) : q;
  } else if (o.rollout != kNoRollout && o.surrogate == kGeoMean) {
    r.q_row = exp_any(A(stats[kSumLogQ]) / r.count_div);
  }
  r.h_max = A(stats[kMaxEntropy]);
  r.vespo_log_w = clampv(A(stats[kSumVespo]), A(kVespoLogMin), A(kVespoLogMax));
  r.vespo_w = exp_any(r.vespo_log_w);
  r.off_kl = A(stats[kSumOffKl]) / r.count_div;
  return r;
}

// ---- the stages of one token ----
// The loss pass of every kernel composes these: ratio -> surrogate -> rollout weight and masks ->
// KL -> combine. CUDA applies them token by token (token_terms); the CPU's tile path runs each
// stage over a tile (one loop per option value, so that every loop vectorizes) and its local path
// fuses them in one loop per template instance; Triton mirrors each function under the same name
// (python/fusedrl/kernels/policy.py).

// The ratio stage: w, wc and their local derivatives pw = dw/dx, pwc = dwc/dx (dw/dc, dwc/dc for the
// cumulative level), and rw, rwc: the factors of the row's dL/ds (sequence, hybrid).
template <typename A> struct RatioTerms {
  A w, wc, pw, pwc, rw, rwc;
};

// token: w = exp(rho); lo, hi, below: the trust region (clip_ratio)
template <typename A> FUSEDRL_HD RatioTerms<A> token_ratio(A rho, A lo, A hi, bool below, const Options& o) {
  const A w = exp_any(clamp_log(rho, o));
  const A pw = w * clamp_log_pass(rho, o);
  return RatioTerms<A>{w, clip_ratio(w, lo, hi, below), pw, clip_ratio_pass(w, lo, hi, below) * pw, A(0), A(0)};
}
// sequence: w = s_i for every token; its dependence on x goes through the row's dL/ds
template <typename A> FUSEDRL_HD RatioTerms<A> sequence_ratio(const Row<A>& row, A lo, A hi, bool below) {
  return RatioTerms<A>{row.s, clip_ratio(row.s, lo, hi, below), A(0), A(0), A(1), clip_ratio_pass(row.s, lo, hi, below)};
}
// sequence-token (GSPO-token): w = exp(min(log s_i, 10)), the gradient a token ratio's
template <typename A> FUSEDRL_HD RatioTerms<A> sequence_token_ratio(const Row<A>& row, A lo, A hi, bool below,
                                                                   const Options& o) {
  const A lw = min_nan(row.log_s, A(kGspoTokenLogMax));
  const A w = exp_any(clamp_log(lw, o));
  const A pw = w * (row.log_s <= A(kGspoTokenLogMax) ? A(1) : A(0)) * clamp_log_pass(lw, o);
  return RatioTerms<A>{w, clip_ratio(w, lo, hi, below), pw, clip_ratio_pass(w, lo, hi, below) * pw, A(0), A(0)};
}
// hybrid: w = a w_token + (1 - a) s_i, a = hybrid_alpha or h / max_row(h) (hybrid_mixing="entropy")
template <typename A> FUSEDRL_HD A hybrid_mix(A h, const Row<A>& row, const Options& o) {
  return o.hybrid_entropy ? (row.h_max > A(0) ? h / row.h_max : A(0)) : A(o.hybrid_alpha);
}
template <typename A>
FUSEDRL_HD RatioTerms<A> hybrid_ratio(A rho, A mix, const Row<A>& row, A lo, A hi, bool below, const Options& o) {
  const A slo = A(o.seq_lo), shi = A(o.seq_hi);
  const A wt = exp_any(clamp_log(rho, o));
  const A pt = wt * clamp_log_pass(rho, o);
  return RatioTerms<A>{mix * wt + (A(1) - mix) * row.s,
                       mix * clip_ratio(wt, lo, hi, below) + (A(1) - mix) * clip_ratio(row.s, slo, shi, below),
                       mix * pt,
                       mix * clip_ratio_pass(wt, lo, hi, below) * pt,
                       A(1) - mix,
                       (A(1) - mix) * clip_ratio_pass(row.s, slo, shi, below)};
}
// cumulative: w = exp(c), wc = exp(c clipped to sqrt(n) [log(1 - lo), log(1 + hi)]), with c and n
// the prefix sums of m rho and m up to the token (the caller's scan)
template <typename A> FUSEDRL_HD RatioTerms<A> cumulative_ratio(A c, A n, bool below, const Options& o) {
  const A root = sqrt_acc(n);
  const A bh = root * A(o.log_hi);
  A cc = min_nan(c, bh);
  A dcc = dmin_a(c, bh);
  if (below) {
    const A bl = root * A(o.log_lo);
    dcc *= dmax_a(cc, bl);
    cc = max_nan(cc, bl);
  }
  const A w = exp_any(clamp_log(c, o)), wc = exp_any(clamp_log(cc, o));
  return RatioTerms<A>{w, wc, w * clamp_log_pass(c, o), wc * clamp_log_pass(cc, o) * dcc, A(0), A(0)};
}
template <typename A>
FUSEDRL_HD RatioTerms<A> ratio_terms(const Options& o, const Row<A>& row, A rho, A h, A c, A n) {
  const A lo = A(o.lo), hi = A(o.hi);
  const bool below = o.clip_below;
  switch (o.ratio) {
    case kToken: return token_ratio(rho, lo, hi, below, o);
    case kSequence: return sequence_ratio(row, lo, hi, below);
    case kSequenceToken: return sequence_token_ratio(row, lo, hi, below, o);
    case kHybrid: return hybrid_ratio(rho, hybrid_mix(h, row, o), row, lo, hi, below, o);
    default: return cumulative_ratio(c, n, below, o);
  }
}

// The surrogate stage: l, its partials dl/dw, dl/dwc and the direct dl/dx, and the clip flags.
template <typename A> struct SurrogateTerms {
  A l, dw, dwc, dx, f_low, f_high, f_dual;
};

// KIND: a Surrogate code. EXTRA (clip): false when delta and the dual clip are both absent.
template <int KIND, bool EXTRA = true, typename A>
FUSEDRL_HD SurrogateTerms<A> surrogate_of(const Options& o, const Row<A>& row, A w, A wc, A adv, A x, A rho) {
  // scalars, returned as one aggregate (struct fields written through pointers stay in memory and
  // stop GCC's vectorizer)
  A l, dw = A(0), dwc = A(0), dx = A(0), f_low = A(0), f_high = A(0), f_dual = A(0);
  if constexpr (KIND == kClip) {
    l = clip_surrogate<EXTRA>(w, wc, adv, o, &dw, &dwc, &f_dual);
  } else if constexpr (KIND == kCispo) {  // -sg(wc) A x
    l = -wc * adv * x;
    dx = -wc * adv;
  } else if constexpr (KIND == kSapo) {
    l = sapo_surrogate(w, adv, o, &dw);
  } else if constexpr (KIND == kReinforce) {
    l = -w * adv;
    dw = -adv;
  } else if constexpr (KIND == kGpg) {
    l = -adv * x;
    dx = -adv;
  } else if constexpr (KIND == kVespo) {  // -sg(phi) A x, phi from the row's sequence weight and the sign of A
    const A phi = vespo_phi(adv, row.vespo_log_w, row.vespo_w, o);
    l = -phi * adv * x;
    dx = -phi * adv;
  } else {  // geo_mean: every token carries the row's -mean(A) exp(mean rho~)
    const A value = -row.adv_mean * row.geo;
    // d/dx_t of the row value; times the row's weight sum in combine (dx_scale: the value is
    // counted on each token)
    const A scale = value * row.geo_pass * (row.count_div > A(0) ? A(1) / row.count_div : A(0));
    A drho, clipped;
    geo_log_ratio(rho, adv, o, &drho, &clipped);
    l = value;
    dx = scale * drho;
    f_low = (clipped != A(0) && adv < A(0)) ? A(1) : A(0);
    f_high = (clipped != A(0) && adv > A(0)) ? A(1) : A(0);
  }
  if constexpr (KIND == kClip || KIND == kCispo) {
    f_low = clipped_low(w, wc, adv);
    f_high = clipped_high(w, wc, adv);
  }
  return SurrogateTerms<A>{l, dw, dwc, dx, f_low, f_high, f_dual};
}
template <typename A>
FUSEDRL_HD SurrogateTerms<A> surrogate_terms(const Options& o, const Row<A>& row, A w, A wc, A adv, A x, A rho) {
  switch (o.surrogate) {
    case kClip: return surrogate_of<kClip>(o, row, w, wc, adv, x, rho);
    case kCispo: return surrogate_of<kCispo>(o, row, w, wc, adv, x, rho);
    case kSapo: return surrogate_of<kSapo>(o, row, w, wc, adv, x, rho);
    case kReinforce: return surrogate_of<kReinforce>(o, row, w, wc, adv, x, rho);
    case kGpg: return surrogate_of<kGpg>(o, row, w, wc, adv, x, rho);
    case kVespo: return surrogate_of<kVespo>(o, row, w, wc, adv, x, rho);
    default: return surrogate_of<kGeoMean>(o, row, w, wc, adv, x, rho);
  }
}

// The rollout weight of a token: per token from d = o - mu, else the row's (sequence modes,
// geo_mean, none: 1).
FUSEDRL_HD bool per_token_rollout(const Options& o) {
  return (o.rollout == kTokenTruncate || o.rollout == kTokenMask || o.rollout == kIcepop) && o.surrogate != kGeoMean;
}
template <typename A> FUSEDRL_HD A token_rollout_weight(const Options& o, const Row<A>& row, A d) {
  return per_token_rollout(o) ? rollout_weight(d, o) : row.q_row;
}

// The KL stage: the value (times w with the bias correction) and its partials through x and w.
// STRAIGHT: the "+" kinds (value of `kind`, gradient of k2).
template <typename A> struct KlTerms {
  A kl, dx, dw;
};
template <int KIND, bool STRAIGHT, bool BIAS, typename A> FUSEDRL_HD KlTerms<A> kl_of(A x, A r, A w) {
  const A diff = x - r;
  A dk;
  const A k = kl_value<KIND>(diff, &dk);
  if (STRAIGHT) dk = diff;
  return KlTerms<A>{BIAS ? k * w : k, BIAS ? dk * w : dk, BIAS ? k : A(0)};
}
template <int KIND, typename A> FUSEDRL_HD KlTerms<A> kl_kind(A x, A r, A w, bool straight, bool bias) {
  if (straight) return bias ? kl_of<KIND, true, true>(x, r, w) : kl_of<KIND, true, false>(x, r, w);
  return bias ? kl_of<KIND, false, true>(x, r, w) : kl_of<KIND, false, false>(x, r, w);
}
template <typename A> FUSEDRL_HD KlTerms<A> kl_terms(A x, A r, A w, int kind, bool straight, bool bias) {
  switch (kind) {
    case kK1: return kl_kind<kK1>(x, r, w, straight, bias);
    case kAbs: return kl_kind<kAbs>(x, r, w, straight, bias);
    case kK2: return kl_kind<kK2>(x, r, w, straight, bias);
    case kK3: return kl_kind<kK3>(x, r, w, straight, bias);
    default: return kl_kind<kLowVar>(x, r, w, straight, bias);
  }
}

// combine: the chain rule of one token (mask weight m, loss coefficient g, rollout weight q, the
// masks' keep, KL coefficient bg; dx_scale multiplies the surrogate's direct partial) and what the
// row sums add: gx = dL/dx_t (the direct part, plus the part through the token's own ratio but for
// the cumulative level), dc = dL/dc_t (cumulative: the part through the ratio), ds = the token's
// share of the row's dL/ds, and m times the loss, KL, ratio, rollout weight and clip flags. A padded
// token (m = 0) gives exact zeros, selected rather than multiplied, even where a row value is inf
// (log_ratio_clamp=None).
//
// GCC vectorizes the `omp simd` loops that compose these only while every struct stays in
// registers: the stages' terms come by const reference (passed by value, or returned all-constant
// from a function, they went through memory), so an absent term is written at the call site
// (KlTerms<A>{0, 0, 0}).
template <typename A> struct TokenTerms {
  A gx, dc, ds, sur, kl, w, q, low, high, dual;
};
template <typename A>
FUSEDRL_HD TokenTerms<A> combine(bool cumulative, A m, A g, A q, A keep, A bg, A dx_scale, const RatioTerms<A>& r,
                                 const SurrogateTerms<A>& s, const KlTerms<A>& k) {
  const A mq = m * (g * q * keep);
  const A dw = mq * s.dw + m * bg * k.dw;
  const A dwc = mq * s.dwc;
  const A dx = mq * (s.dx * dx_scale) + m * bg * k.dx;
  const A local = through_ratio(dw, r.pw, dwc, r.pwc);
  const bool ok = m != A(0);
  return TokenTerms<A>{ok ? (cumulative ? dx : dx + local) : A(0),
                       ok ? local : A(0),
                       ok ? dw * r.rw + dwc * r.rwc : A(0),
                       ok ? m * q * keep * s.l : A(0),
                       ok ? m * k.kl : A(0),
                       ok ? m * r.w : A(0),
                       ok ? m * q : A(0),
                       m * s.f_low,
                       m * s.f_high,
                       m * s.f_dual};
}

// One token's operands (0 on a padded token) and the constants of its row.
template <typename A> struct Token {
  A m, x, o, adv, r, mu, h;
};
template <typename A> struct RowTerms {
  Row<A> row;
  A g, bg, eg;   // the loss, KL and entropy coefficients (beta and entropy_coef folded in)
  A dx_scale;    // geo_mean: the row's weight sum (its value is counted on each token), else 1
  bool has_ref;
};

// The whole composition for one token (c, n: the cumulative level's prefix sums through it).
template <typename A> FUSEDRL_HD TokenTerms<A> token_terms(const Options& o, const RowTerms<A>& rt, const Token<A>& k,
                                                           A c, A n) {
  const Row<A>& row = rt.row;
  const A rho = k.x - k.o;
  const RatioTerms<A> r = ratio_terms(o, row, rho, k.h, c, n);
  const SurrogateTerms<A> s = surrogate_terms(o, row, r.w, r.wc, k.adv, k.x, rho);
  const A q = token_rollout_weight(o, row, k.o - k.mu);
  const A keep = token_keep(k.adv, k.h, row.off_kl, o);
  const KlTerms<A> kt = rt.has_ref ? kl_terms(k.x, k.r, r.w, o.kl, o.kl_straight, o.bias_kl) : KlTerms<A>{A(0), A(0), A(0)};
  return combine(o.ratio == kCumulative, k.m, rt.g, q, keep, rt.bg, rt.dx_scale, r, s, kt);
}

}  // namespace policy
}  // namespace fusedrl

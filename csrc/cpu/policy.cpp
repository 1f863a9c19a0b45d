// The fused policy objective on the CPU: ratio -> surrogate -> rollout correction -> KL -> entropy
// -> aggregation, values, metrics and d loss / d logp in one pass over the tokens (plus a first
// pass for the row statistics when the options need them). Per-token math: fusedrl/policy.h.
//
// Rows (sequences) are spread over OpenMP threads; a row is walked in tiles of kTile tokens (a
// tile that is all padding is not computed: its gradient is zero). Each tile is loaded once (every
// operand converted to the accumulation type A). The token ratio level with the clip or CISPO
// surrogate (GRPO, DAPO, Dr.GRPO, dual clip, CISPO: the common configurations) and the sequence
// level with the clip surrogate (GSPO) then take the local path: one loop computes each token in
// registers, one template instance per surrogate x KL kind x rollout mode (local_rows). Every
// other configuration takes the tile path: one short loop per stage (ratio, surrogate, rollout,
// KL, combine) whose option switch sits outside the loop, so every loop vectorizes whatever the
// options. Row-coupled levels (sequence, hybrid: a row sum; cumulative: a suffix sum) keep the
// row's partial gradient in a per-thread scratch row (L1/L2-resident) and finish it in a second
// sweep over that scratch: the inputs are still read once and the gradient written once.
//
// Per-row sums are accumulated in double in token order, so the results do not depend on the
// number of threads.
#include "fusedrl/policy_args.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/isa.h"

namespace fusedrl {
namespace cpu {
namespace {

using namespace ::fusedrl::policy;

constexpr int64_t kTile = 256;

// A thread's tile buffers. The tile starts zeroed (run()) and each array is written by one stage
// only, through the same branch on every tile of a call (the options are fixed per call): an array
// that the branch does not write stays 0, so no stage re-zeroes what it leaves out (memsets per
// tile cost ~12% of the pass).
template <typename A> struct Tile {
  // operands (cleaned: 0 on padded tokens) and the mask weight m (0 = padding)
  A x[kTile], o[kTile], adv[kTile], m[kTile], r[kTile], mu[kTile], h[kTile];
  // ratio stage: w, wc and their local derivatives (dw/dx, or dw/dc for cumulative), row factors
  A w[kTile], wc[kTile], pw[kTile], pwc[kTile], rw[kTile], rwc[kTile];
  // surrogate stage: l and dl/dw, dl/dwc, dl/dx; the clip flags
  A l[kTile], dw[kTile], dwc[kTile], dx[kTile], f_low[kTile], f_high[kTile], f_dual[kTile];
  // rollout weight, KL value and its partials through x and w, the gradient
  A q[kTile], kl[kTile], dkl_x[kTile], dkl_w[kTile], g[kTile], dc[kTile];
  // the masks on the surrogate (1: kept), written on every tile
  A keep[kTile];
};

// load_mask: the tile's mask into T.m; returns the tile's valid extent: one past its last valid
// (nonzero) token, 0 when it is all padding.
template <typename A> FUSEDRL_HD int64_t load_mask(const PolicyArgs& a, int64_t i, int64_t start, int64_t t0, int64_t n,
                                                   Tile<A>& T) {
  load(a.mask, i, start, t0, n, T.m);
  // a scan from the end: blocks of 32 tokens while they are all padding (vectorized: the scalar
  // scan alone was ~8% of a step at the benchmark's 37% right padding), then token by token
  int64_t extent = n;
  while (extent >= 32) {
    int any = 0;
#pragma omp simd reduction(| : any)
    for (int64_t j = extent - 32; j < extent; ++j) any |= T.m[j] != A(0) ? 1 : 0;
    if (any) break;
    extent -= 32;
  }
  while (extent > 0 && T.m[extent - 1] == A(0)) --extent;
  return extent;
}

template <typename A> using LoadFn = void (*)(const PolicyArgs&, int64_t, int64_t, int64_t, int64_t, int, Tile<A>&);
template <typename A> using MaskFn = int64_t (*)(const PolicyArgs&, int64_t, int64_t, int64_t, int64_t, Tile<A>&);
template <typename A> using StoreFn = void (*)(const View&, int64_t, int64_t, int64_t, int64_t, const A*);

template <typename A> struct Work {
  const PolicyArgs* a;
  Tile<A>* tile;
  A* scratch;      // 3 rows of `longest` (row-coupled levels): gradient, mask weight, dL/dc
  int64_t longest;
  LoadFn<A> load;  // load_tile, load_mask and store for this CPU (the local path calls them out of line)
  MaskFn<A> load_mask;
  StoreFn<A> store;
};

FUSEDRL_HD void row_span(const PolicyArgs& a, int64_t i, int64_t* start, int64_t* len) {
  if (a.cu_seqlens) {
    *start = a.cu_seqlens[i];
    *len = a.cu_seqlens[i + 1] - a.cu_seqlens[i];
  } else {
    *start = 0;
    *len = a.T;
  }
}

// Loads the tile's mask weight and the operands in `which` (bit flags below), each cleaned to 0 on
// padded tokens in its own loop (operands that are not loaded keep the zeros of the fresh tile).
// kHaveMask: T.m already holds this tile's mask (load_mask).
enum : int { kX = 1, kO = 2, kAdv = 4, kRef = 8, kMu = 16, kH = 32, kHaveMask = 64 };
template <typename A> FUSEDRL_HD void load_clean(const View& v, int64_t i, int64_t start, int64_t t0, int64_t n,
                                                 const A* m, A* out) {
  load(v, i, start, t0, n, out);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = m[j] != A(0) ? out[j] : A(0);
}
template <typename A>
FUSEDRL_HD void load_tile(const PolicyArgs& a, int64_t i, int64_t start, int64_t t0, int64_t n, int which, Tile<A>& T) {
  if (!(which & kHaveMask)) load(a.mask, i, start, t0, n, T.m);
  if (which & (kX | kO)) load_clean(a.logp, i, start, t0, n, T.m, T.x);
  if (which & kO) {
    if (a.old_logp.p) load_clean(a.old_logp, i, start, t0, n, T.m, T.o);
    else std::copy(T.x, T.x + n, T.o);
  }
  if (which & kAdv) load_clean(a.adv, i, start, t0, n, T.m, T.adv);
  if ((which & kRef) && a.ref_logp.p) load_clean(a.ref_logp, i, start, t0, n, T.m, T.r);
  if ((which & kMu) && a.rollout_logp.p) load_clean(a.rollout_logp, i, start, t0, n, T.m, T.mu);
  if ((which & kH) && a.entropy.p) load_clean(a.entropy, i, start, t0, n, T.m, T.h);
}

// ---------------------------------------------------------------------------------------------
// pass 1: row statistics

template <typename A> FUSEDRL_HD void stats_rows(const Work<A>& wk, int64_t r0, int64_t r1) {
  const PolicyArgs& a = *wk.a;
  const Options& o = a.opt;
  Tile<A>& T = *wk.tile;
  const bool need_rho = o.ratio == kSequence || o.ratio == kSequenceToken || o.ratio == kHybrid;
  const bool geo = o.surrogate == kGeoMean;
  const bool need_adv = geo || a.stats_adv;
  const bool seq_roll = o.rollout == kSequenceTruncate || o.rollout == kSequenceMask;
  const bool tok_roll_geo = geo && o.rollout != kNoRollout && !seq_roll;
  const bool need_h = o.ratio == kHybrid && o.hybrid_entropy;
  const bool vespo = o.surrogate == kVespo;
  const bool off = o.has_off_policy_mask;
  const bool off_mu = off && a.rollout_logp.p != nullptr;  // the sampler's log-probs, else the old ones
  int which = 0;
  if (need_rho || geo || vespo || off) which |= kX | kO;
  if (seq_roll || tok_roll_geo || off_mu) which |= kO | kMu;
  if (need_adv) which |= kAdv;
  if (need_h) which |= kH;
  for (int64_t i = r0; i < r1; ++i) {
    int64_t start, len;
    row_span(a, i, &start, &len);
    double cnt = 0, srho = 0, sadv = 0, sgeo = 0, sroll = 0, slogq = 0, svespo = 0, soff = 0;
    A hmax = -std::numeric_limits<A>::infinity();
    for (int64_t t0 = 0; t0 < len; t0 += kTile) {
      const int64_t n = std::min(kTile, len - t0);
      if (load_mask(a, i, start, t0, n, T) == 0) {  // all padding: nothing to sum (h counts as 0)
        if (need_h) hmax = hmax > A(0) ? hmax : A(0);
        continue;
      }
      load_tile(a, i, start, t0, n, which | kHaveMask, T);
#pragma omp simd reduction(+ : cnt)
      for (int64_t j = 0; j < n; ++j) cnt += double(T.m[j]);
      if (need_rho) {
#pragma omp simd reduction(+ : srho)
        for (int64_t j = 0; j < n; ++j) srho += double(T.m[j] * (T.x[j] - T.o[j]));
      }
      if (need_adv) {
#pragma omp simd reduction(+ : sadv)
        for (int64_t j = 0; j < n; ++j) sadv += double(T.m[j] * T.adv[j]);
      }
      if (geo) {
        for (int64_t j = 0; j < n; ++j) {
          A drho, clipped;
          sgeo += double(T.m[j] * geo_log_ratio(T.x[j] - T.o[j], T.adv[j], o, &drho, &clipped));
        }
      }
      if (seq_roll) {
#pragma omp simd reduction(+ : sroll)
        for (int64_t j = 0; j < n; ++j) sroll += double(T.m[j] * (T.o[j] - T.mu[j]));
      }
      if (tok_roll_geo) {
        for (int64_t j = 0; j < n; ++j)
          slogq += double(T.m[j] * log_acc(rollout_weight(T.o[j] - T.mu[j], o) + A(kGeoMeanLogEps)));
      }
      if (need_h) {
        for (int64_t j = 0; j < n; ++j) hmax = T.h[j] > hmax ? T.h[j] : hmax;  // padded tokens count as 0
      }
      if (vespo) {
#pragma omp simd reduction(+ : svespo)
        for (int64_t j = 0; j < n; ++j) svespo += double(T.m[j] * clamp_log(T.x[j] - T.o[j], o));
      }
      if (off) {
        const A* mu = off_mu ? T.mu : T.o;
#pragma omp simd reduction(+ : soff)
        for (int64_t j = 0; j < n; ++j) soff += double(T.m[j] * (mu[j] - T.x[j]));
      }
    }
    double* st = a.stats + i * kNumStats;
    st[kCount] = cnt;
    st[kSumRho] = srho;
    st[kSumAdv] = sadv;
    st[kSumGeo] = sgeo;
    st[kSumRollout] = sroll;
    st[kSumLogQ] = slogq;
    st[kMaxEntropy] = double(hmax);
    st[kSumVespo] = svespo;
    st[kSumOffKl] = soff;
  }
}

// ---------------------------------------------------------------------------------------------
// pass 2: loss, metrics, gradients

// Stores a stage's terms of token j into the tile.
template <typename A> FUSEDRL_HD void put(Tile<A>& T, int64_t j, const RatioTerms<A>& r) {
  T.w[j] = r.w, T.wc[j] = r.wc, T.pw[j] = r.pw, T.pwc[j] = r.pwc, T.rw[j] = r.rw, T.rwc[j] = r.rwc;
}
template <typename A> FUSEDRL_HD void put(Tile<A>& T, int64_t j, const SurrogateTerms<A>& s) {
  T.l[j] = s.l, T.dw[j] = s.dw, T.dwc[j] = s.dwc, T.dx[j] = s.dx;
  T.f_low[j] = s.f_low, T.f_high[j] = s.f_high, T.f_dual[j] = s.f_dual;
}

// The ratio stage (policy.h ratio_terms), one loop per level. c_carry / n_carry: cumulative prefixes.
template <typename A>
FUSEDRL_HD void ratio_stage(const Options& opt, const Row<A>& row, int64_t n, Tile<A>& T, double* c_carry,
                            double* n_carry) {
  const Options o = opt;  // a local copy: stores to the tile cannot alias it
  const A lo = A(o.lo), hi = A(o.hi);
  const bool below = o.clip_below;
  switch (o.ratio) {
    case kToken:
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) put(T, j, token_ratio(T.x[j] - T.o[j], lo, hi, below, o));
      break;
    case kSequence: {
      const RatioTerms<A> r = sequence_ratio(row, lo, hi, below);
      for (int64_t j = 0; j < n; ++j) put(T, j, r);
      break;
    }
    case kSequenceToken: {
      const RatioTerms<A> r = sequence_token_ratio(row, lo, hi, below, o);
      for (int64_t j = 0; j < n; ++j) put(T, j, r);
      break;
    }
    case kHybrid:
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) put(T, j, hybrid_ratio(T.x[j] - T.o[j], hybrid_mix(T.h[j], row, o), row, lo, hi, below, o));
      break;
    default: {  // cumulative: the prefix sums in double, in token order
      double c = *c_carry, cnt = *n_carry;
      for (int64_t j = 0; j < n; ++j) {
        c += double(T.m[j] * (T.x[j] - T.o[j]));
        cnt += double(T.m[j]);
        put(T, j, cumulative_ratio(A(c), A(cnt), below, o));
      }
      *c_carry = c;
      *n_carry = cnt;
      break;
    }
  }
}

// The surrogate stage (policy.h surrogate_of), one loop per surrogate.
template <int KIND, typename A> FUSEDRL_HD void surrogate_loop(const Options& o, const Row<A>& row, int64_t n, Tile<A>& T) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) put(T, j, surrogate_of<KIND>(o, row, T.w[j], T.wc[j], T.adv[j], T.x[j], T.x[j] - T.o[j]));
}
template <typename A> FUSEDRL_HD void surrogate_stage(const Options& opt, const Row<A>& row, int64_t n, Tile<A>& T) {
  const Options o = opt;  // a local copy: stores to the tile cannot alias it
  switch (o.surrogate) {
    case kClip: surrogate_loop<kClip>(o, row, n, T); break;
    case kCispo: surrogate_loop<kCispo>(o, row, n, T); break;
    case kSapo: surrogate_loop<kSapo>(o, row, n, T); break;
    case kReinforce: surrogate_loop<kReinforce>(o, row, n, T); break;
    case kGpg: surrogate_loop<kGpg>(o, row, n, T); break;
    case kVespo: surrogate_loop<kVespo>(o, row, n, T); break;
    default: surrogate_loop<kGeoMean>(o, row, n, T); break;
  }
}

template <typename A> FUSEDRL_HD void rollout_stage(const Options& opt, const Row<A>& row, int64_t n, Tile<A>& T) {
  const Options o = opt;  // a local copy: stores to the tile cannot alias it
  if (per_token_rollout(o)) {
    if (o.rollout == kTokenTruncate) {  // one loop per mode: the mode select would stop the vectorizer
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) T.q[j] = rollout_truncate(T.o[j] - T.mu[j], o);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) T.q[j] = rollout_mask(T.o[j] - T.mu[j], o);
    }
  } else {
    for (int64_t j = 0; j < n; ++j) T.q[j] = row.q_row;
  }
}

// The off-policy and entropy masks: T.keep (1 without masks). One loop per combination (a bool
// option inside the select of a simd loop stops GCC's vectorizer).
template <typename A> FUSEDRL_HD void mask_stage(const Options& opt, const Row<A>& row, int64_t n, Tile<A>& T) {
  const Options o = opt;  // a local copy: stores to the tile cannot alias it
  if (o.has_off_policy_mask && o.has_entropy_mask) {
    for (int64_t j = 0; j < n; ++j) T.keep[j] = off_policy_keep(T.adv[j], row.off_kl, o) * entropy_keep(T.h[j], o);
  } else if (o.has_off_policy_mask) {
    for (int64_t j = 0; j < n; ++j) T.keep[j] = off_policy_keep(T.adv[j], row.off_kl, o);
  } else if (o.has_entropy_mask) {
    for (int64_t j = 0; j < n; ++j) T.keep[j] = entropy_keep(T.h[j], o);
  } else {
    std::fill(T.keep, T.keep + n, A(1));
  }
}

// KIND, STRAIGHT and BIAS are template arguments: a bool option inside the select of a simd loop
// stops GCC's vectorizer.
template <int KIND, bool STRAIGHT, bool BIAS, typename A> FUSEDRL_HD void kl_loop(int64_t n, Tile<A>& T) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const KlTerms<A> k = kl_of<KIND, STRAIGHT, BIAS>(T.x[j], T.r[j], T.w[j]);
    T.kl[j] = k.kl, T.dkl_x[j] = k.dx, T.dkl_w[j] = k.dw;
  }
}

template <int KIND, typename A> FUSEDRL_HD void kl_kind(const Options& o, int64_t n, Tile<A>& T) {
  if (o.kl_straight) {
    if (o.bias_kl) kl_loop<KIND, true, true>(n, T);
    else kl_loop<KIND, true, false>(n, T);
  } else {
    if (o.bias_kl) kl_loop<KIND, false, true>(n, T);
    else kl_loop<KIND, false, false>(n, T);
  }
}

template <typename A> FUSEDRL_HD void kl_stage(const Options& o, bool has_ref, int64_t n, Tile<A>& T) {
  if (!has_ref) return;  // kl, dkl_x, dkl_w stay 0 (see Tile)
  switch (o.kl) {
    case kK1: kl_kind<kK1>(o, n, T); break;
    case kAbs: kl_kind<kAbs>(o, n, T); break;
    case kK2: kl_kind<kK2>(o, n, T); break;
    case kK3: kl_kind<kK3>(o, n, T); break;
    default: kl_kind<kLowVar>(o, n, T); break;
  }
}

// A row's outputs (the Output enum) from its sums over the valid tokens.
template <typename A>
FUSEDRL_HD void write_row(double* out, A g, A bg, A eg, double s_sur, double s_kl, double s_h, double cnt, double c_low,
                          double c_high, double c_dual, double s_w, double s_q) {
  out[kLoss] = double(g) * s_sur + double(bg) * s_kl - double(eg) * s_h;
  out[kOutCount] = cnt;
  out[kClipLow] = c_low;
  out[kClipHigh] = c_high;
  out[kClipDual] = c_dual;
  out[kRatio] = s_w;
  out[kKl] = s_kl;
  out[kEntropy] = s_h;
  out[kRolloutWeight] = s_q;
}

// Row-coupled levels (sequence, hybrid): every valid token's gradient gets m_t dL/ds ds/d(sum m rho),
// with ds = s s_pass / n per unit of m rho (dlds: the row's sum of dL/dw rw + dL/dwc rwc).
template <typename A>
FUSEDRL_HD void add_sequence_share(int64_t len, const Row<A>& row, double dlds, A* gx_row, const A* m_row) {
  const A k = sequence_share(dlds, row.s, row.s_pass, row.count_div);
#pragma omp simd
  for (int64_t t = 0; t < len; ++t) gx_row[t] = m_row[t] != A(0) ? gx_row[t] + m_row[t] * k : A(0);
}

template <typename A> FUSEDRL_HD void loss_rows(const Work<A>& wk, int64_t r0, int64_t r1) {
  const PolicyArgs& a = *wk.a;
  const Options& o = a.opt;
  Tile<A>& T = *wk.tile;
  const bool coupled = o.ratio == kSequence || o.ratio == kHybrid;
  const bool cumulative = o.ratio == kCumulative;
  const bool want_gx = a.grad_logp.p != nullptr, want_gh = a.grad_entropy.p != nullptr;
  const bool has_ref = a.ref_logp.p != nullptr;
  const bool has_h = a.entropy.p != nullptr;
  const int which = kX | kO | kAdv | (has_ref ? kRef : 0) | (o.rollout != kNoRollout ? kMu : 0) | (has_h ? kH : 0);
  for (int64_t i = r0; i < r1; ++i) {
    int64_t start, len;
    row_span(a, i, &start, &len);
    Row<A> row{};
    row.count_div = A(1);
    row.q_row = A(1);
    row.s = row.geo = A(1);
    if (a.stats) row = row_quantities<A>(a.stats + i * kNumStats, o);
    const A g = A(a.coef[3 * i]), bg = A(o.beta * a.coef[3 * i + 1]), eg = A(o.entropy_coef * a.coef[3 * i + 2]);
    // geo_mean: the row value is counted on each of the row's tokens (weight sum n)
    const A geo_weight = a.stats ? A(a.stats[i * kNumStats + kCount]) : A(0);
    double s_sur = 0, s_kl = 0, s_h = 0, cnt = 0, c_low = 0, c_high = 0, c_dual = 0, s_w = 0, s_q = 0;
    double dlds = 0, c_carry = 0, n_carry = 0;
    A* gx_row = wk.scratch;
    A* m_row = wk.scratch + wk.longest;
    A* dc_row = wk.scratch + 2 * wk.longest;
    for (int64_t t0 = 0; t0 < len; t0 += kTile) {
      const int64_t n = std::min(kTile, len - t0);
      if (load_mask(a, i, start, t0, n, T) == 0) {  // all padding: zero gradients, nothing to sum
        std::fill(T.g, T.g + n, A(0));
        if (want_gx && (coupled || cumulative)) {
          std::fill(gx_row + t0, gx_row + t0 + n, A(0));
          std::fill(m_row + t0, m_row + t0 + n, A(0));
          std::fill(dc_row + t0, dc_row + t0 + n, A(0));
        } else if (want_gx) {
          store(a.grad_logp, i, start, t0, n, T.g);
        }
        if (want_gh) store(a.grad_entropy, i, start, t0, n, T.g);
        continue;
      }
      load_tile(a, i, start, t0, n, which | kHaveMask, T);
      ratio_stage(o, row, n, T, &c_carry, &n_carry);
      surrogate_stage(o, row, n, T);
      rollout_stage(o, row, n, T);
      mask_stage(o, row, n, T);
      kl_stage(o, has_ref, n, T);
      const A dx_scale = o.surrogate == kGeoMean ? geo_weight : A(1);
      // the tile's sums in A (each simd lane adds n / width terms), then added to the row's in double
      A t_sur = 0, t_kl = 0, t_h = 0, t_cnt = 0, t_low = 0, t_high = 0, t_dual = 0, t_w = 0, t_q = 0, t_ds = 0;
#pragma omp simd reduction(+ : t_sur, t_kl, t_h, t_cnt, t_low, t_high, t_dual, t_w, t_q, t_ds)
      for (int64_t j = 0; j < n; ++j) {
        const A m = T.m[j];
        const RatioTerms<A> r{T.w[j], T.wc[j], T.pw[j], T.pwc[j], T.rw[j], T.rwc[j]};
        const SurrogateTerms<A> sr{T.l[j], T.dw[j], T.dwc[j], T.dx[j], T.f_low[j], T.f_high[j], T.f_dual[j]};
        const KlTerms<A> k{T.kl[j], T.dkl_x[j], T.dkl_w[j]};
        const TokenTerms<A> t = combine(cumulative, m, g, T.q[j], T.keep[j], bg, dx_scale, r, sr, k);
        T.g[j] = t.gx;
        T.dc[j] = t.dc;
        t_ds += t.ds;
        t_sur += t.sur;
        t_kl += t.kl;
        t_h += m * T.h[j];
        t_cnt += m;
        t_low += t.low;
        t_high += t.high;
        t_dual += t.dual;
        t_w += t.w;
        t_q += t.q;
      }
      s_sur += t_sur, s_kl += t_kl, s_h += t_h, cnt += t_cnt, c_low += t_low, c_high += t_high;
      c_dual += t_dual, s_w += t_w, s_q += t_q, dlds += t_ds;
      if (want_gx) {
        if (coupled || cumulative) {
          std::copy(T.g, T.g + n, gx_row + t0);
          std::copy(T.m, T.m + n, m_row + t0);
          std::copy(T.dc, T.dc + n, dc_row + t0);
        } else {
          store(a.grad_logp, i, start, t0, n, T.g);
        }
      }
      if (want_gh) {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) T.g[j] = -eg * T.m[j];
        store(a.grad_entropy, i, start, t0, n, T.g);
      }
    }
    if (want_gx && coupled) add_sequence_share(len, row, dlds, gx_row, m_row);
    if (want_gx && cumulative) {  // c_t = sum_{t'<=t} m rho: dL/dx_t = direct_t + m_t sum_{t'>=t} dL/dc_t'
      double suffix = 0;
      for (int64_t t = len - 1; t >= 0; --t) {
        suffix += double(dc_row[t]);
        gx_row[t] += m_row[t] * A(suffix);
      }
    }
    if (want_gx && (coupled || cumulative)) {
      for (int64_t t0 = 0; t0 < len; t0 += kTile) store(a.grad_logp, i, start, t0, std::min(kTile, len - t0), gx_row + t0);
    }
    write_row(a.rows + i * kNumOutputs, g, bg, eg, s_sur, s_kl, s_h, cnt, c_low, c_high, c_dual, s_w, s_q);
  }
}

// ---------------------------------------------------------------------------------------------
// pass 2, the local path: the token ratio level, surrogate clip or CISPO, rollout correction none or
// per token, any KL estimator but the straight-through and bias-corrected kinds. Every term of a
// token depends on that token alone, so after the tile's loads one loop computes the whole token
// in registers (no stage arrays: those loads and stores were 3/4 of the tile path's time).
// SUR (a LocalSurrogate), KL (-1: no KL term) and ROLL (0 none, 1 truncate, 2 mask / icepop) are
// template arguments (one instance per combination, chosen once per call); the per-token math is
// the tile path's. SEQ: GSPO's sequence level with the clip surrogates (KL none, k3 or low_var_kl):
// every token's ratio is the row's s_i from the statistics pass, so the loop is the same but for
// the row's share of d s_i / d x_t, added to the row's gradient in the scratch row at its end.
enum LocalSurrogate : int { kLocalClip = 0, kLocalClipExtra = 1, kLocalCispo = 2 };  // extra: dual clip or delta

template <int SUR, int KL, int ROLL, bool SEQ, typename A>
FUSEDRL_HD void local_rows(const Work<A>& wk, int64_t r0, int64_t r1) {
  const PolicyArgs& a = *wk.a;
  const Options o = a.opt;
  Tile<A>& T = *wk.tile;
  const bool want_gx = a.grad_logp.p != nullptr, want_gh = a.grad_entropy.p != nullptr;
  const bool has_h = a.entropy.p != nullptr;
  const int which = kHaveMask | kX | (SEQ && !ROLL ? 0 : kO) | kAdv | (KL >= 0 ? kRef : 0) | (ROLL ? kMu : 0) |
                    (has_h ? kH : 0);
  const A lo = lower_bound(A(o.lo), o.clip_below), hi = A(o.hi);  // -inf: only the upper bound clips
  const bool below = true;  // (the bool in the loop's selects would stop the vectorizer)
  // SEQ (GSPO's sequence level): the gradient goes to the scratch row, finished by the row's share
  A* gx_row = wk.scratch;
  A* m_row = wk.scratch + wk.longest;
  for (int64_t i = r0; i < r1; ++i) {
    int64_t start, len;
    row_span(a, i, &start, &len);
    const A g = A(a.coef[3 * i]), bg = A(o.beta * a.coef[3 * i + 1]), eg = A(o.entropy_coef * a.coef[3 * i + 2]);
    // the sequence ratio s_i and its trust region: constants of the row (the statistics pass)
    Row<A> row{};
    if (SEQ) row = row_quantities<A>(a.stats + i * kNumStats, o);
    // (as scalars: a struct read inside the loop below stays in memory)
    const RatioTerms<A> s_ratio = sequence_ratio(row, lo, hi, below);
    const A seq_w = s_ratio.w, seq_wc = s_ratio.wc, seq_rwc = s_ratio.rwc;
    double s_sur = 0, s_kl = 0, s_h = 0, cnt = 0, c_low = 0, c_high = 0, c_dual = 0, s_w = 0, s_q = 0, dlds = 0;
    for (int64_t t0 = 0; t0 < len; t0 += kTile) {
      const int64_t n_tile = std::min(kTile, len - t0);
      // tokens past the tile's last valid one (right padding) are not computed: zero gradients
      const int64_t n = wk.load_mask(a, i, start, t0, n_tile, T);
      std::fill(T.g + n, T.g + n_tile, A(0));
      if (n == 0) {
        if (want_gx && SEQ) {
          std::fill(gx_row + t0, gx_row + t0 + n_tile, A(0));
          std::fill(m_row + t0, m_row + t0 + n_tile, A(0));
        } else if (want_gx) {
          wk.store(a.grad_logp, i, start, t0, n_tile, T.g);
        }
        if (want_gh) wk.store(a.grad_entropy, i, start, t0, n_tile, T.g);
        continue;
      }
      wk.load(a, i, start, t0, n, which, T);
      // the tile's sums (KL and rollout weight only when the options make them vary; entropy below)
      A t_sur = 0, t_kl = 0, t_cnt = 0, t_low = 0, t_high = 0, t_dual = 0, t_w = 0, t_q = 0, t_ds = 0;
#pragma omp simd reduction(+ : t_sur, t_kl, t_cnt, t_low, t_high, t_dual, t_w, t_q, t_ds)
      for (int64_t j = 0; j < n; ++j) {
        const A m = T.m[j], x = T.x[j], adv = T.adv[j];
        // SEQ: w = s_i for every token, no direct dependence on x_t (its share comes at the row's end)
        const RatioTerms<A> r = SEQ ? RatioTerms<A>{seq_w, seq_wc, A(0), A(0), A(1), seq_rwc}
                                    : token_ratio(x - T.o[j], lo, hi, below, o);
        // surrogate_of<kClip> / <kCispo> and kl_of written out with this loop's locals: GCC does not
        // vectorize the loop through them (their zeroed out-parameters stay in memory)
        A l, l_dw = A(0), l_dwc = A(0), l_dx = A(0), hit = A(0);
        if (SUR == kLocalCispo) {
          l = -r.wc * adv * x;
          l_dx = -r.wc * adv;
        } else {
          l = clip_surrogate<SUR == kLocalClipExtra>(r.w, r.wc, adv, o, &l_dw, &l_dwc, &hit);
        }
        const SurrogateTerms<A> sr{l, l_dw, l_dwc, l_dx, clipped_low(r.w, r.wc, adv), clipped_high(r.w, r.wc, adv), hit};
        A q = A(1);
        if (ROLL == 1) q = rollout_truncate(T.o[j] - T.mu[j], o);
        if (ROLL == 2) q = rollout_mask(T.o[j] - T.mu[j], o);
        A kl = A(0), dkl = A(0);
        if (KL >= 0) kl = kl_value<(KL >= 0 ? KL : 0)>(x - T.r[j], &dkl);
        const KlTerms<A> k{kl, dkl, A(0)};
        const TokenTerms<A> t = combine(false, m, g, q, A(1), bg, A(1), r, sr, k);
        T.g[j] = t.gx;
        t_sur += t.sur;
        if (KL >= 0) t_kl += t.kl;
        t_cnt += m;
        t_low += t.low;
        t_high += t.high;
        if (SUR == kLocalClipExtra) t_dual += t.dual;
        t_w += t.w;
        if (ROLL) t_q += t.q;
        if (SEQ) t_ds += t.ds;
      }
      A t_h = 0;
      if (has_h) {
#pragma omp simd reduction(+ : t_h)
        for (int64_t j = 0; j < n; ++j) t_h += T.m[j] * T.h[j];
      }
      s_sur += t_sur, s_kl += t_kl, s_h += t_h, cnt += t_cnt, c_low += t_low, c_high += t_high;
      c_dual += t_dual, s_w += t_w, s_q += ROLL ? t_q : t_cnt, dlds += t_ds;
      if (want_gx && SEQ) {
        std::copy(T.g, T.g + n_tile, gx_row + t0);
        std::copy(T.m, T.m + n_tile, m_row + t0);
      } else if (want_gx) {
        wk.store(a.grad_logp, i, start, t0, n_tile, T.g);
      }
      if (want_gh) {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) T.g[j] = -eg * T.m[j];
        wk.store(a.grad_entropy, i, start, t0, n_tile, T.g);
      }
    }
    if (want_gx && SEQ) {
      add_sequence_share(len, row, dlds, gx_row, m_row);
      for (int64_t t0 = 0; t0 < len; t0 += kTile) {
        wk.store(a.grad_logp, i, start, t0, std::min(kTile, len - t0), gx_row + t0);
      }
    }
    write_row(a.rows + i * kNumOutputs, g, bg, eg, s_sur, s_kl, s_h, cnt, c_low, c_high, c_dual, s_w, s_q);
  }
}

// ---------------------------------------------------------------------------------------------
// entry points: rows over OpenMP threads, the hot row functions compiled per ISA

FUSEDRL_ISA_VARIANTS(stats_f32, Work<float>, stats_rows, float)
FUSEDRL_ISA_VARIANTS(stats_f64, Work<double>, stats_rows, double)
FUSEDRL_ISA_VARIANTS(loss_f32, Work<float>, loss_rows, float)
FUSEDRL_ISA_VARIANTS(loss_f64, Work<double>, loss_rows, double)
#undef FUSEDRL_ISA_VARIANTS

// The tile loads and stores for this CPU, compiled once per ISA (inlined into every local_rows
// instance, their dtype switches made the build 6x longer).
#define FUSEDRL_IO_VARIANT(SUFFIX, TARGET)                                                                  \
  template <typename A>                                                                                    \
  TARGET void load_##SUFFIX(const PolicyArgs& a, int64_t i, int64_t start, int64_t t0, int64_t n, int which, \
                            Tile<A>& T) {                                                                  \
    load_tile(a, i, start, t0, n, which, T);                                                               \
  }                                                                                                        \
  template <typename A>                                                                                    \
  TARGET int64_t mask_##SUFFIX(const PolicyArgs& a, int64_t i, int64_t start, int64_t t0, int64_t n, Tile<A>& T) { \
    return load_mask(a, i, start, t0, n, T);                                                               \
  }                                                                                                        \
  template <typename A>                                                                                    \
  TARGET void store_##SUFFIX(const View& v, int64_t i, int64_t start, int64_t t0, int64_t n, const A* in) {  \
    store(v, i, start, t0, n, in);                                                                         \
  }
FUSEDRL_IO_VARIANT(avx512, FUSEDRL_TARGET_AVX512)
FUSEDRL_IO_VARIANT(avx2, FUSEDRL_TARGET_AVX2)
FUSEDRL_IO_VARIANT(base, )
#undef FUSEDRL_IO_VARIANT

template <typename A> void set_io(Work<A>* wk) {
  switch (isa_level()) {
    case kIsaAvx512: wk->load = load_avx512<A>, wk->load_mask = mask_avx512<A>, wk->store = store_avx512<A>; break;
    case kIsaAvx2: wk->load = load_avx2<A>, wk->load_mask = mask_avx2<A>, wk->store = store_avx2<A>; break;
    default: wk->load = load_base<A>, wk->load_mask = mask_base<A>, wk->store = store_base<A>; break;
  }
}

template <typename A> using RowFn = void (*)(const Work<A>&, int64_t, int64_t);

// The local path's instance for this CPU (float accumulation; float64 log-probs take the tile path).
template <int SUR, int KL, int ROLL, bool SEQ> struct Local {
  FUSEDRL_TARGET_AVX512 static void avx512(const Work<float>& w, int64_t r0, int64_t r1) {
    local_rows<SUR, KL, ROLL, SEQ, float>(w, r0, r1);
  }
  FUSEDRL_TARGET_AVX2 static void avx2(const Work<float>& w, int64_t r0, int64_t r1) {
    local_rows<SUR, KL, ROLL, SEQ, float>(w, r0, r1);
  }
  static void base(const Work<float>& w, int64_t r0, int64_t r1) { local_rows<SUR, KL, ROLL, SEQ, float>(w, r0, r1); }
  static RowFn<float> pick() {
    switch (isa_level()) {
      case kIsaAvx512: return avx512;
      case kIsaAvx2: return avx2;
      default: return base;
    }
  }
};

template <int SUR, int ROLL, bool SEQ> RowFn<float> local_kl(int kl, bool has_ref) {
  if (!has_ref) return Local<SUR, -1, ROLL, SEQ>::pick();
  if constexpr (SEQ) {  // the sequence level: instances for k3 and low_var_kl (the others take the tile path)
    if (kl == kK3) return Local<SUR, kK3, ROLL, SEQ>::pick();
    if (kl == kLowVar) return Local<SUR, kLowVar, ROLL, SEQ>::pick();
    return nullptr;
  } else {
    switch (kl) {
      case kK1: return Local<SUR, kK1, ROLL, SEQ>::pick();
      case kAbs: return Local<SUR, kAbs, ROLL, SEQ>::pick();
      case kK2: return Local<SUR, kK2, ROLL, SEQ>::pick();
      case kK3: return Local<SUR, kK3, ROLL, SEQ>::pick();
      default: return Local<SUR, kLowVar, ROLL, SEQ>::pick();
    }
  }
}

template <int SUR, bool SEQ> RowFn<float> local_rollout(const Options& o, bool has_ref) {
  switch (o.rollout) {
    case kNoRollout: return local_kl<SUR, 0, SEQ>(o.kl, has_ref);
    case kTokenTruncate: return local_kl<SUR, 1, SEQ>(o.kl, has_ref);
    case kTokenMask:
    case kIcepop: return local_kl<SUR, 2, SEQ>(o.kl, has_ref);
    default: return nullptr;
  }
}

// The local path when the options allow it (see local_rows), else null.
RowFn<float> local_path(const PolicyArgs& a) {
  const Options& o = a.opt;
  if (o.kl_straight || o.bias_kl || o.has_off_policy_mask || o.has_entropy_mask) return nullptr;
  const bool has_ref = a.ref_logp.p != nullptr;
  const bool extra = o.has_dual || o.has_delta;
  if (o.ratio == kSequence) {  // GSPO: clip surrogates only (the statistics pass gave s_i)
    if (o.surrogate != kClip || a.stats == nullptr) return nullptr;
    return extra ? local_rollout<kLocalClipExtra, true>(o, has_ref) : local_rollout<kLocalClip, true>(o, has_ref);
  }
  if (o.ratio != kToken) return nullptr;
  if (o.surrogate == kClip && extra) return local_rollout<kLocalClipExtra, false>(o, has_ref);
  if (o.surrogate == kClip) return local_rollout<kLocalClip, false>(o, has_ref);
  if (o.surrogate == kCispo) return local_rollout<kLocalCispo, false>(o, has_ref);
  return nullptr;
}

template <typename A> void run(const PolicyArgs& a, RowFn<A> fn, bool scratch) {
  int64_t longest = a.T;
  if (a.cu_seqlens) {
    longest = 0;
    for (int64_t i = 0; i < a.B; ++i) longest = std::max(longest, a.cu_seqlens[i + 1] - a.cu_seqlens[i]);
  }
  const int nt = int(std::max<int64_t>(1, std::min<int64_t>(a.num_threads, a.B)));
#pragma omp parallel num_threads(nt)
  {
    std::vector<Tile<A>> tile(1);  // zero-initialized: operands that are never loaded read as 0
    std::vector<A> buf(scratch ? size_t(3 * longest) : 0);
    Work<A> wk{&a, tile.data(), buf.data(), longest, nullptr, nullptr, nullptr};
    set_io(&wk);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < a.B; ++i) fn(wk, i, i + 1);
  }
}

bool is_f64(const PolicyArgs& a) { return a.logp.dtype == kFloat64; }

}  // namespace

bool policy_stats(const PolicyArgs& a) {
  if (a.logp.dtype < 0 || a.logp.dtype > kFloat64) return false;
  if (is_f64(a)) run<double>(a, stats_f64(), false);
  else run<float>(a, stats_f32(), false);
  return true;
}

bool policy_loss(const PolicyArgs& a) {
  if (a.logp.dtype < 0 || a.logp.dtype > kFloat64) return false;
  const bool scratch = a.grad_logp.p && (a.opt.ratio == kSequence || a.opt.ratio == kHybrid || a.opt.ratio == kCumulative);
  if (is_f64(a)) {
    run<double>(a, loss_f64(), scratch);
  } else {
    const RowFn<float> local = local_path(a);
    run<float>(a, local ? local : loss_f32(), scratch);
  }
  return true;
}

}  // namespace cpu
}  // namespace fusedrl

// The fused policy objective on the GPU: the CUDA twin of csrc/cpu/policy.cpp (same semantics, same
// per-token math: fusedrl/policy.h, whose functions are host/device). Pass 1 (policy_stats) writes
// the row statistics [B, kNumStats]; pass 2 (policy_loss) writes the rows [B, kNumOutputs] and the
// gradients d loss / d logp, d loss / d entropy in their own dtypes (padded tokens get 0).
//
// Launch shape: one block of kThreads threads per row (grid.x = rows, grid-stride over rows, so the
// block index is uniform and every barrier below is reached by the whole block). A row is walked in
// chunks of kThreads consecutive tokens, one token per thread (token t0 + tid: coalesced loads and
// stores whatever the dtype). Every operand is converted to the accumulation type A right after its
// load (A = float for fp32 / bf16 / fp16 log-probs, double for fp64), each by its own dtype code,
// and selected to 0 on tokens with mask == 0 before any arithmetic (padded tokens load nothing but
// the mask).
//
// Reductions: each thread accumulates its tokens' contributions in double, in token order; the block
// then reduces them in a fixed order (a shuffle tree per warp, then the kWarps warp sums in warp
// order), so the per-row results do not depend on the grid size and are reproducible run to run.
// The entropy max of hybrid mixing is reduced the same way with the CPU kernel's select (NaN never
// wins).
//
// Row-coupled gradients (pass 2):
//  * token / sequence-token: token-local, every thread writes its tokens' gradient at once.
//  * sequence / hybrid (dL/dx_t = local_t + m_t dL/ds s s_pass / n): the first sweep computes the
//    metric sums and dL/ds; a row of at most one window (kChunks chunks, Shape<A>::kWindow tokens)
//    keeps each thread's local gradients and mask weights in registers and adds the row term after
//    the block reduction; a longer row recomputes its local gradients in a second sweep (the inputs
//    are read twice, the gradient written once).
//  * cumulative (c_t = sum_{t' <= t} m rho): a block-wide inclusive scan of (m rho, m) per chunk,
//    in double, with the prefix carried from chunk to chunk (uniform over the block), gives c_t and
//    n_t; the gradient m_t sum_{t' >= t} dL/dc_t' is a reverse (suffix) block scan of dL/dc, chunks
//    taken from the last, with the suffix carried. A row of one window keeps dL/dc, the direct part
//    and m in registers between the two scans. A longer row stores the prefix carry at the start of
//    its windows in shared memory (every `stride`-th window when the row has more than
//    kMaxCheckpoints windows) during the first sweep, then walks the windows from the last,
//    re-deriving each window's prefix from its checkpoint with the same scans (bitwise the same
//    carries) and recomputing its tokens before the suffix scan.
// Defaults: kThreads = 256, a window of 8 chunks (2048 tokens) for float, 4 (1024) for double;
// 512 checkpoints (16 B each), so rows up to 1M (float) / 512K (double) tokens use stride 1.
//
// The row functions are templated on the block type (DeviceBlock: threadIdx, __syncthreads, warp
// shuffles and shared memory), which keeps the thread cooperation in one place; only DeviceBlock
// exists, so they are exercised on a GPU only (tests/gpu).
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <limits>

#include "fusedrl/policy_args.h"
#include "fusedrl/policy.h"

// Unrolls the per-chunk loops in device code (the register arrays are indexed by constants then).
#if defined(__CUDA_ARCH__)
#define FUSEDRL_UNROLL _Pragma("unroll")
#else
#define FUSEDRL_UNROLL
#endif

// Chunks per window (float; double uses half as many) and shared-memory checkpoints per row; the
// defaults suit the hardware, a test harness may shrink them to reach the long-row paths cheaply.
#ifndef FUSEDRL_POLICY_CUDA_CHUNKS
#define FUSEDRL_POLICY_CUDA_CHUNKS 8
#endif
#ifndef FUSEDRL_POLICY_CUDA_CHECKPOINTS
#define FUSEDRL_POLICY_CUDA_CHECKPOINTS 512
#endif

namespace fusedrl {
namespace cuda {
namespace {

using namespace ::fusedrl::policy;

constexpr int kThreads = 256;  // threads per block (a multiple of 32)
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxCheckpoints = FUSEDRL_POLICY_CUDA_CHECKPOINTS;

static_assert(kThreads % 32 == 0, "whole warps");
static_assert(FUSEDRL_POLICY_CUDA_CHUNKS >= 1 && kMaxCheckpoints >= 1, "at least one chunk and one checkpoint");

// A window: the tokens a thread keeps in registers (kChunks, one per chunk of kThreads tokens).
template <typename A> struct Shape {
  static constexpr int kChunks = sizeof(A) == 8 ? (FUSEDRL_POLICY_CUDA_CHUNKS + 1) / 2 : FUSEDRL_POLICY_CUDA_CHUNKS;
  static constexpr int64_t kWindow = int64_t(kThreads) * kChunks;
};

// How a ratio level couples the gradient of a row's tokens (the header comment).
enum Level : int { kLevelLocal = 0, kLevelRowSum = 1, kLevelPrefix = 2 };

// Per-thread sums of pass 1 and pass 2 (reduced over the block).
enum StatSum : int { kSCount = 0, kSRho, kSAdv, kSGeo, kSRoll, kSLogQ, kSVespo, kSOff, kNumStatSums };
enum LossSum : int { kLSur = 0, kLKl, kLH, kLCount, kLLow, kLHigh, kLDual, kLW, kLQ, kLDlds, kNumLossSums };

struct Pair {  // a (m rho, m) prefix, or any two doubles scanned together
  double a, b;
};

// ---------------------------------------------------------------------------------------------
// block primitives on the device

struct Shared {
  double sums[kWarps][kNumLossSums];
  Pair pairs[kWarps];
  double ones[kWarps];
};

// Every member is called by the whole block (uniform control flow) and ends with a barrier, so the
// shared scratch can be reused by the next call. On the host these bodies are empty (never called).
struct DeviceBlock {
  int tid;
  Shared* sm;
  Pair* ck;  // the row's prefix checkpoints (cumulative), kMaxCheckpoints of them

  FUSEDRL_HD Pair* checkpoints() const { return ck; }

  FUSEDRL_HD void sync() const {
#if defined(__CUDA_ARCH__)
    __syncthreads();
#endif
  }

  // v[0, N) <- the block's sums (every thread gets them): a shuffle tree per warp, then the warp
  // sums in warp order.
  template <int N> FUSEDRL_HD void sum(double* v) const {
#if defined(__CUDA_ARCH__)
    const int lane = tid & 31, warp = tid >> 5;
FUSEDRL_UNROLL
    for (int j = 0; j < N; ++j) {
      double x = v[j];
FUSEDRL_UNROLL
      for (int off = 16; off > 0; off >>= 1) x += __shfl_down_sync(kFullMask, x, off);
      if (lane == 0) sm->sums[warp][j] = x;
    }
    __syncthreads();
FUSEDRL_UNROLL
    for (int j = 0; j < N; ++j) {
      double s = sm->sums[0][j];
      for (int w = 1; w < kWarps; ++w) s += sm->sums[w][j];
      v[j] = s;
    }
    __syncthreads();
#else
    (void)v;
#endif
  }

  // The block's max with the CPU kernel's select (o > v ? o : v: a NaN never replaces a value).
  template <typename A> FUSEDRL_HD A max(A v) const {
#if defined(__CUDA_ARCH__)
    const int lane = tid & 31, warp = tid >> 5;
FUSEDRL_UNROLL
    for (int off = 16; off > 0; off >>= 1) {
      const A o = __shfl_down_sync(kFullMask, v, off);
      v = o > v ? o : v;
    }
    if (lane == 0) sm->ones[warp] = double(v);  // exact for float
    __syncthreads();
    A m = A(sm->ones[0]);
    for (int w = 1; w < kWarps; ++w) {
      const A o = A(sm->ones[w]);
      m = o > m ? o : m;
    }
    __syncthreads();
    return m;
#else
    return v;
#endif
  }

  // Inclusive scan in thread order; *total = the block's sum (bitwise the last thread's value).
  FUSEDRL_HD Pair scan(Pair v, Pair* total) const {
#if defined(__CUDA_ARCH__)
    const int lane = tid & 31, warp = tid >> 5;
FUSEDRL_UNROLL
    for (int off = 1; off < 32; off <<= 1) {
      const double a = __shfl_up_sync(kFullMask, v.a, off), b = __shfl_up_sync(kFullMask, v.b, off);
      if (lane >= off) {
        v.a = a + v.a;
        v.b = b + v.b;
      }
    }
    if (lane == 31) sm->pairs[warp] = v;
    __syncthreads();
    Pair before{0.0, 0.0}, all{0.0, 0.0};
    for (int w = 0; w < kWarps; ++w) {
      const Pair p = sm->pairs[w];
      if (w < warp) {
        before.a += p.a;
        before.b += p.b;
      }
      all.a += p.a;
      all.b += p.b;
    }
    __syncthreads();
    *total = all;
    if (warp > 0) {
      v.a = before.a + v.a;
      v.b = before.b + v.b;
    }
    return v;
#else
    *total = v;
    return v;
#endif
  }

  // Inclusive suffix scan (sum over this thread and the later ones); *total = the block's sum.
  FUSEDRL_HD double rscan(double v, double* total) const {
#if defined(__CUDA_ARCH__)
    const int lane = tid & 31, warp = tid >> 5;
FUSEDRL_UNROLL
    for (int off = 1; off < 32; off <<= 1) {
      const double o = __shfl_down_sync(kFullMask, v, off);
      if (lane + off < 32) v = o + v;
    }
    if (lane == 0) sm->ones[warp] = v;
    __syncthreads();
    double after = 0.0, all = 0.0;
    for (int w = kWarps - 1; w >= 0; --w) {
      const double p = sm->ones[w];
      if (w > warp) after += p;
      all += p;
    }
    __syncthreads();
    *total = all;
    return warp < kWarps - 1 ? after + v : v;
#else
    *total = v;
    return v;
#endif
  }
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

// One token's operands (policy.h Token), cleaned: all 0 on a padded token (mask == 0), whose
// operands are not read.
enum : int { kX = 1, kO = 2, kAdv = 4, kRef = 8, kMu = 16, kH = 32 };
template <typename A> FUSEDRL_HD Token<A> zero_token() {
  Token<A> k;
  k.m = k.x = k.o = k.adv = k.r = k.mu = k.h = A(0);
  return k;
}

template <typename A> FUSEDRL_HD Token<A> load_token(const PolicyArgs& a, int64_t i, int64_t pos, int which) {
  Token<A> k = zero_token<A>();
  const A m = load_elem<A>(a.mask, i, pos);
  if (!(m != A(0))) return k;
  k.m = m;
  if (which & (kX | kO)) k.x = load_elem<A>(a.logp, i, pos);
  if (which & kO) k.o = a.old_logp.p ? load_elem<A>(a.old_logp, i, pos) : k.x;
  if (which & kAdv) k.adv = load_elem<A>(a.adv, i, pos);
  if ((which & kRef) && a.ref_logp.p) k.r = load_elem<A>(a.ref_logp, i, pos);
  if ((which & kMu) && a.rollout_logp.p) k.mu = load_elem<A>(a.rollout_logp, i, pos);
  if ((which & kH) && a.entropy.p) k.h = load_elem<A>(a.entropy, i, pos);
  return k;
}

// ---------------------------------------------------------------------------------------------
// pass 1: row statistics

struct StatPlan {
  bool rho, adv, geo, seq_roll, tok_roll_geo, h, vespo, off, off_mu;
  int which;
};

FUSEDRL_HD StatPlan stat_plan(const PolicyArgs& a) {
  const Options& o = a.opt;
  StatPlan p;
  p.rho = o.ratio == kSequence || o.ratio == kSequenceToken || o.ratio == kHybrid;
  p.geo = o.surrogate == kGeoMean;
  p.adv = p.geo || a.stats_adv;
  p.seq_roll = o.rollout == kSequenceTruncate || o.rollout == kSequenceMask;
  p.tok_roll_geo = p.geo && o.rollout != kNoRollout && !p.seq_roll;
  p.h = o.ratio == kHybrid && o.hybrid_entropy;
  p.vespo = o.surrogate == kVespo;
  p.off = o.has_off_policy_mask;
  p.off_mu = p.off && a.rollout_logp.p != nullptr;  // the sampler's log-probs, else the old ones
  p.which = 0;
  if (p.rho || p.geo || p.vespo || p.off) p.which |= kX | kO;
  if (p.seq_roll || p.tok_roll_geo || p.off_mu) p.which |= kO | kMu;
  if (p.adv) p.which |= kAdv;
  if (p.h) p.which |= kH;
  return p;
}

template <typename A>
FUSEDRL_HD void stats_token(const Options& o, const StatPlan& p, const Token<A>& k, double* s, A* hmax) {
  s[kSCount] += double(k.m);
  if (p.rho) s[kSRho] += double(k.m * (k.x - k.o));
  if (p.adv) s[kSAdv] += double(k.m * k.adv);
  if (p.geo) {
    A drho, clipped;
    s[kSGeo] += double(k.m * geo_log_ratio(k.x - k.o, k.adv, o, &drho, &clipped));
  }
  if (p.seq_roll) s[kSRoll] += double(k.m * (k.o - k.mu));
  if (p.tok_roll_geo) s[kSLogQ] += double(k.m * log_acc(rollout_weight(k.o - k.mu, o) + A(kGeoMeanLogEps)));
  if (p.h) *hmax = k.h > *hmax ? k.h : *hmax;  // padded tokens count as 0
  if (p.vespo) s[kSVespo] += double(k.m * clamp_log(k.x - k.o, o));
  if (p.off) s[kSOff] += double(k.m * ((p.off_mu ? k.mu : k.o) - k.x));
}

template <typename A, typename Blk> FUSEDRL_HD void stats_row(const PolicyArgs& a, int64_t i, const Blk& blk) {
  const StatPlan p = stat_plan(a);
  int64_t start, len;
  row_span(a, i, &start, &len);
  double s[kNumStatSums] = {};
  A hmax = -std::numeric_limits<A>::infinity();
  for (int64_t t = blk.tid; t < len; t += kThreads) {
    stats_token(a.opt, p, load_token<A>(a, i, start + t, p.which), s, &hmax);
  }
  blk.template sum<kNumStatSums>(s);
  hmax = blk.max(hmax);
  if (blk.tid == 0) {
    double* st = a.stats + i * kNumStats;
    st[kCount] = s[kSCount];
    st[kSumRho] = s[kSRho];
    st[kSumAdv] = s[kSAdv];
    st[kSumGeo] = s[kSGeo];
    st[kSumRollout] = s[kSRoll];
    st[kSumLogQ] = s[kSLogQ];
    st[kMaxEntropy] = double(hmax);
    st[kSumVespo] = s[kSVespo];
    st[kSumOffKl] = s[kSOff];
  }
}

// ---------------------------------------------------------------------------------------------
// pass 2: loss, metrics, gradients

// What every token of row i shares: policy.h's RowTerms, and what this kernel reads and writes.
template <typename A> struct RowCtx : RowTerms<A> {
  bool want_gx, want_gh;
  int which;
};

template <typename A> FUSEDRL_HD RowCtx<A> row_ctx(const PolicyArgs& a, int64_t i) {
  const Options& o = a.opt;
  RowCtx<A> rc;
  rc.row = Row<A>{};
  rc.row.count_div = A(1);
  rc.row.q_row = A(1);
  rc.row.s = rc.row.geo = A(1);
  if (a.stats) rc.row = row_quantities<A>(a.stats + i * kNumStats, o);
  rc.g = A(a.coef[3 * i]);
  rc.bg = A(o.beta * a.coef[3 * i + 1]);
  rc.eg = A(o.entropy_coef * a.coef[3 * i + 2]);
  const A geo_weight = a.stats ? A(a.stats[i * kNumStats + kCount]) : A(0);
  rc.dx_scale = o.surrogate == kGeoMean ? geo_weight : A(1);
  rc.has_ref = a.ref_logp.p != nullptr;
  rc.want_gx = a.grad_logp.p != nullptr;
  rc.want_gh = a.grad_entropy.p != nullptr;
  rc.which = kX | kO | kAdv | (rc.has_ref ? kRef : 0) | (o.rollout != kNoRollout ? kMu : 0) |
             (a.entropy.p ? kH : 0);
  return rc;
}

// One token through policy.h's composition (token_terms). c / n: the inclusive prefixes sum m rho
// and sum m (cumulative only). Adds the token's terms to s[kNumLossSums] and returns in *gx its
// gradient without the row term (cumulative: the direct part only) and in *dc its dL/dc (cumulative).
template <typename A>
FUSEDRL_HD void loss_token(const Options& o, const RowCtx<A>& rc, const Token<A>& k, double c, double n, double* s,
                           A* gx, A* dc) {
  const TokenTerms<A> t = token_terms(o, rc, k, A(c), A(n));
  *gx = t.gx;
  *dc = t.dc;
  s[kLDlds] += double(t.ds);
  s[kLSur] += double(t.sur);
  s[kLKl] += double(t.kl);
  s[kLH] += double(k.m * k.h);
  s[kLCount] += double(k.m);
  s[kLLow] += double(t.low);
  s[kLHigh] += double(t.high);
  s[kLDual] += double(t.dual);
  s[kLW] += double(t.w);
  s[kLQ] += double(t.q);
}

template <typename A> FUSEDRL_HD void write_row(const PolicyArgs& a, int64_t i, const RowCtx<A>& rc, const double* s) {
  double* out = a.rows + i * kNumOutputs;
  out[kLoss] = double(rc.g) * s[kLSur] + double(rc.bg) * s[kLKl] - double(rc.eg) * s[kLH];
  out[kOutCount] = s[kLCount];
  out[kClipLow] = s[kLLow];
  out[kClipHigh] = s[kLHigh];
  out[kClipDual] = s[kLDual];
  out[kRatio] = s[kLW];
  out[kKl] = s[kLKl];
  out[kEntropy] = s[kLH];
  out[kRolloutWeight] = s[kLQ];
}

// The block scan of one chunk's (m rho, m): this thread's inclusive prefixes (*c, *n, the carry
// included) and the carry moved past the chunk.
template <typename A, typename Blk>
FUSEDRL_HD void prefix_step(const Token<A>& k, const Blk& blk, Pair* carry, double* c, double* n) {
  Pair v;
  v.a = double(k.m * (k.x - k.o));
  v.b = double(k.m);
  Pair total;
  const Pair incl = blk.scan(v, &total);
  *c = carry->a + incl.a;
  *n = carry->b + incl.b;
  carry->a += total.a;
  carry->b += total.b;
}

// Window w of a row-coupled level: chunk j's token of this thread (if any) into gx[j], m[j], dc[j]
// (0 past the row). `first`: the first sweep (writes the entropy gradient; s collects the sums).
template <typename A, int LEVEL, typename Blk>
FUSEDRL_HD void window(const PolicyArgs& a, int64_t i, int64_t start, int64_t len, int64_t w, const RowCtx<A>& rc,
                       const Blk& blk, Pair* carry, double* s, A* gx, A* m, A* dc, bool first) {
  constexpr int kChunks = Shape<A>::kChunks;
FUSEDRL_UNROLL
  for (int j = 0; j < kChunks; ++j) {
    gx[j] = m[j] = dc[j] = A(0);
    const int64_t t0 = w * Shape<A>::kWindow + int64_t(j) * kThreads;
    if (t0 >= len) continue;  // uniform over the block
    const int64_t t = t0 + blk.tid;
    const bool in = t < len;
    const Token<A> k = in ? load_token<A>(a, i, start + t, rc.which) : zero_token<A>();
    double c = 0.0, n = 0.0;
    if constexpr (LEVEL == kLevelPrefix) prefix_step(k, blk, carry, &c, &n);
    if (in) {
      loss_token(a.opt, rc, k, c, n, s, &gx[j], &dc[j]);
      m[j] = k.m;
      if (first && rc.want_gh) store_elem(a.grad_entropy, i, start + t, -rc.eg * k.m);
    }
  }
}

// Moves the prefix carry past window w (the same loads and scans as `window`: bitwise the same).
template <typename A, typename Blk>
FUSEDRL_HD void advance(const PolicyArgs& a, int64_t i, int64_t start, int64_t len, int64_t w, const Blk& blk,
                        Pair* carry) {
  constexpr int kChunks = Shape<A>::kChunks;
  for (int j = 0; j < kChunks; ++j) {
    const int64_t t0 = w * Shape<A>::kWindow + int64_t(j) * kThreads;
    if (t0 >= len) break;
    const int64_t t = t0 + blk.tid;
    const Token<A> k = t < len ? load_token<A>(a, i, start + t, kX | kO) : zero_token<A>();
    double c, n;
    prefix_step(k, blk, carry, &c, &n);
  }
}

// Cumulative: the gradient of window w, chunks from the last: direct part + m sum_{t' >= t} dL/dc.
template <typename A, typename Blk>
FUSEDRL_HD void suffix_window(const PolicyArgs& a, int64_t i, int64_t start, int64_t len, int64_t w, const Blk& blk,
                              const A* gx, const A* m, const A* dc, double* suffix) {
  constexpr int kChunks = Shape<A>::kChunks;
FUSEDRL_UNROLL
  for (int j = kChunks - 1; j >= 0; --j) {
    const int64_t t0 = w * Shape<A>::kWindow + int64_t(j) * kThreads;
    if (t0 >= len) continue;  // uniform
    const int64_t t = t0 + blk.tid;
    const bool in = t < len;
    double total;
    const double incl = blk.rscan(in ? double(dc[j]) : 0.0, &total);
    if (in) store_elem(a.grad_logp, i, start + t, gx[j] + m[j] * A(*suffix + incl));
    *suffix += total;
  }
}

// Sequence / hybrid (LEVEL kLevelRowSum) and cumulative (kLevelPrefix): windows (header comment).
template <typename A, int LEVEL, typename Blk>
FUSEDRL_HD void loss_row_coupled(const PolicyArgs& a, int64_t i, int64_t start, int64_t len, const RowCtx<A>& rc,
                                 double* s, const Blk& blk) {
  constexpr int kChunks = Shape<A>::kChunks;
  constexpr int64_t kWindow = Shape<A>::kWindow;
  A gx[kChunks], m[kChunks], dc[kChunks];
  const int64_t windows = (len + kWindow - 1) / kWindow;
  const int64_t stride = windows > 0 ? (windows + kMaxCheckpoints - 1) / kMaxCheckpoints : 1;
  const bool checkpoint = LEVEL == kLevelPrefix && rc.want_gx && windows > 1;
  Pair* ck = blk.checkpoints();
  Pair carry{0.0, 0.0};
  for (int64_t w = 0; w < windows; ++w) {
    if (checkpoint && w % stride == 0 && blk.tid == 0) ck[w / stride] = carry;  // read after barriers
    window<A, LEVEL>(a, i, start, len, w, rc, blk, &carry, s, gx, m, dc, true);
  }
  blk.template sum<kNumLossSums>(s);
  if (blk.tid == 0) write_row(a, i, rc, s);
  if (!rc.want_gx) return;

  if constexpr (LEVEL == kLevelRowSum) {  // dL/dx_t += m_t dL/ds ds/d(sum m rho), ds = s / n per unit of m rho
    const A row_term = sequence_share(s[kLDlds], rc.row.s, rc.row.s_pass, rc.row.count_div);
    if (windows == 1) {
FUSEDRL_UNROLL
      for (int j = 0; j < kChunks; ++j) {
        const int64_t t = int64_t(j) * kThreads + blk.tid;
        if (t < len) store_elem(a.grad_logp, i, start + t, m[j] != A(0) ? gx[j] + m[j] * row_term : A(0));
      }
    } else {  // the local parts again, token by token
      double scratch[kNumLossSums] = {};
      for (int64_t t = blk.tid; t < len; t += kThreads) {
        const Token<A> k = load_token<A>(a, i, start + t, rc.which);
        A g, d;
        loss_token(a.opt, rc, k, 0.0, 0.0, scratch, &g, &d);
        store_elem(a.grad_logp, i, start + t, k.m != A(0) ? g + k.m * row_term : A(0));
      }
    }
  } else {  // cumulative: dL/dx_t = direct_t + m_t sum_{t' >= t} dL/dc_t'
    double suffix = 0.0;
    if (windows == 1) {
      suffix_window(a, i, start, len, 0, blk, gx, m, dc, &suffix);
    } else {
      double scratch[kNumLossSums] = {};
      for (int64_t w = windows - 1; w >= 0; --w) {
        const int64_t cp = w / stride;
        Pair c = ck[cp];
        for (int64_t v = cp * stride; v < w; ++v) advance<A>(a, i, start, len, v, blk, &c);
        window<A, LEVEL>(a, i, start, len, w, rc, blk, &c, scratch, gx, m, dc, false);
        suffix_window(a, i, start, len, w, blk, gx, m, dc, &suffix);
      }
      blk.sync();  // every thread has read the checkpoints before the next row writes them
    }
  }
}

template <typename A, int LEVEL, typename Blk> FUSEDRL_HD void loss_row(const PolicyArgs& a, int64_t i, const Blk& blk) {
  int64_t start, len;
  row_span(a, i, &start, &len);
  const RowCtx<A> rc = row_ctx<A>(a, i);
  double s[kNumLossSums] = {};
  if constexpr (LEVEL == kLevelLocal) {  // every gradient is known token by token
    for (int64_t t = blk.tid; t < len; t += kThreads) {
      const Token<A> k = load_token<A>(a, i, start + t, rc.which);
      A gx, dc;
      loss_token(a.opt, rc, k, 0.0, 0.0, s, &gx, &dc);
      if (rc.want_gx) store_elem(a.grad_logp, i, start + t, gx);
      if (rc.want_gh) store_elem(a.grad_entropy, i, start + t, -rc.eg * k.m);
    }
    blk.template sum<kNumLossSums>(s);
    if (blk.tid == 0) write_row(a, i, rc, s);
  } else {
    loss_row_coupled<A, LEVEL>(a, i, start, len, rc, s, blk);
  }
}

// ---------------------------------------------------------------------------------------------
// kernels and entry points

template <typename A>
__global__ void __launch_bounds__(kThreads) policy_stats_kernel(const __grid_constant__ PolicyArgs a) {
  __shared__ Shared sm;
  const DeviceBlock blk{int(threadIdx.x), &sm, nullptr};
  for (int64_t i = blockIdx.x; i < a.B; i += gridDim.x) stats_row<A>(a, i, blk);  // i uniform over the block
}

template <typename A, int LEVEL>
__global__ void __launch_bounds__(kThreads) policy_loss_kernel(const __grid_constant__ PolicyArgs a) {
  __shared__ Shared sm;
  __shared__ Pair ck[LEVEL == kLevelPrefix ? kMaxCheckpoints : 1];
  const DeviceBlock blk{int(threadIdx.x), &sm, ck};
  for (int64_t i = blockIdx.x; i < a.B; i += gridDim.x) loss_row<A, LEVEL>(a, i, blk);
}

const char* launch_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

unsigned row_grid(int64_t B) { return static_cast<unsigned>(B < INT_MAX ? B : INT_MAX); }

template <typename A> void launch_stats(const PolicyArgs& a, cudaStream_t s) {
  policy_stats_kernel<A><<<row_grid(a.B), kThreads, 0, s>>>(a);
}

template <typename A> void launch_loss(const PolicyArgs& a, cudaStream_t s) {
  switch (a.opt.ratio) {
    case kSequence:
    case kHybrid: policy_loss_kernel<A, kLevelRowSum><<<row_grid(a.B), kThreads, 0, s>>>(a); break;
    case kCumulative: policy_loss_kernel<A, kLevelPrefix><<<row_grid(a.B), kThreads, 0, s>>>(a); break;
    default: policy_loss_kernel<A, kLevelLocal><<<row_grid(a.B), kThreads, 0, s>>>(a); break;
  }
}

const char* kBadDtype = "fusedrl: unsupported dtype code";

bool bad_dtype(const PolicyArgs& a) { return a.logp.dtype < kFloat32 || a.logp.dtype > kFloat64; }

}  // namespace

const char* policy_stats(const PolicyArgs& a, uintptr_t stream) {
  if (bad_dtype(a)) return kBadDtype;
  if (a.B <= 0) return nullptr;
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (a.logp.dtype == kFloat64) launch_stats<double>(a, s);
  else launch_stats<float>(a, s);
  return launch_error();
}

const char* policy_loss(const PolicyArgs& a, uintptr_t stream) {
  if (bad_dtype(a)) return kBadDtype;
  if (a.B <= 0) return nullptr;
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (a.logp.dtype == kFloat64) launch_loss<double>(a, s);
  else launch_loss<float>(a, s);
  return launch_error();
}

}  // namespace cuda
}  // namespace fusedrl

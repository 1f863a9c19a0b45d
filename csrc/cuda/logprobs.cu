// Token log-probs and entropy from logits on the GPU: the CUDA twin of csrc/cpu/logprobs.cpp (same
// semantics), with the per-element math from fusedrl/logprobs.h.
//
// Forward: one block of kThreads threads per row (grid-stride over rows on grid.x). Each thread
// walks its share of the row with lse_push, then the block merges the states with lse_merge:
// an xor-shuffle butterfly inside each warp, one state per warp in shared memory, and a second
// butterfly in warp 0. Thread 0 writes logp, entropy, the row max and the log-normalizer.
// Backward: a 2-D grid, rows on grid.x (grid-stride) and column blocks on grid.y (grid-stride over
// V); every element of grad_logits is written, from logprob_grad with the saved row max,
// log-normalizer and entropy.
//
// Rows are read (and the gradient written) in 16-byte vectors where the row allows it: a scalar
// head up to the first 16-byte boundary, the aligned body in vectors, a scalar tail. Any V, row
// stride and base alignment works; the backward vectorizes only when the logits row and the
// gradient row are aligned alike (otherwise the whole row is scalar).
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>

#include "fusedrl/logprobs_args.h"
#include "fusedrl/logprobs.h"

// Unrolls the per-vector loops in device code (the host pass of nvcc sees the same functions).
#if defined(__CUDA_ARCH__)
#define FUSEDRL_UNROLL _Pragma("unroll")
#else
#define FUSEDRL_UNROLL
#endif

namespace fusedrl {
namespace cuda {
namespace {

constexpr int kThreads = 256;  // threads per block (a multiple of 32)
constexpr int kWarps = kThreads / 32;
constexpr int kVecBytes = 16;  // one uint4
constexpr int64_t kBwdTargetBlocks = 4096;  // backward: column blocks are added until about this many
constexpr int64_t kMaxGridY = 65535;
constexpr unsigned kFullMask = 0xffffffffu;

static_assert(kThreads % 32 == 0 && kWarps <= 32, "the cross-warp merge runs in one warp");

// Accumulation (and fp32/fp64 output) type: fp32 for fp32/bf16/fp16 logits, fp64 for fp64.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// Upcast right after the load; round to the storage type right before the store.
FUSEDRL_HD float upcast(float x) { return to_float(x); }
FUSEDRL_HD float upcast(bf16_t x) { return to_float(x); }
FUSEDRL_HD float upcast(f16_t x) { return to_float(x); }
FUSEDRL_HD double upcast(double x) { return to_double(x); }

template <typename T> FUSEDRL_HD T downcast(typename Acc<T>::type x) { return from_float<T>(x); }
template <> FUSEDRL_HD double downcast<double>(double x) { return x; }

// How a row of V elements starting at byte address `addr` splits into a scalar head [0, head),
// 16-byte vectors [head, head + nvec * kVec) and a scalar tail [tail0, V).
struct RowSplit {
  int64_t head, nvec, tail0;
};

template <typename T> FUSEDRL_HD RowSplit row_split(uintptr_t addr, int64_t V) {
  constexpr int64_t kVec = kVecBytes / int64_t(sizeof(T));
  RowSplit sp;
  if (addr % sizeof(T) != 0) {  // not even element-aligned: all scalar
    sp.head = V;
    sp.nvec = 0;
    sp.tail0 = V;
    return sp;
  }
  int64_t head = int64_t((kVecBytes - addr % kVecBytes) % kVecBytes) / int64_t(sizeof(T));
  if (head > V) head = V;
  sp.head = head;
  sp.nvec = (V - head) / kVec;
  sp.tail0 = head + sp.nvec * kVec;
  return sp;
}

// The split of a logits row, usable for the gradient row only if that one reaches a 16-byte
// boundary at the same element; otherwise all scalar.
template <typename T> FUSEDRL_HD RowSplit row_split2(uintptr_t z_addr, uintptr_t g_addr, int64_t V) {
  RowSplit sp = row_split<T>(z_addr, V);
  if (sp.nvec > 0 && (g_addr + uintptr_t(sp.head) * sizeof(T)) % kVecBytes != 0) {
    sp.head = V;
    sp.nvec = 0;
    sp.tail0 = V;
  }
  return sp;
}

template <typename T> struct FwdParams {
  using acc_t = typename Acc<T>::type;
  const T* __restrict__ logits;
  const int64_t* __restrict__ labels;
  int64_t N, V, row_stride, ignore_index;
  acc_t inv_temp;
  acc_t* __restrict__ logp;
  acc_t* __restrict__ entropy;  // null: not computed
  acc_t* __restrict__ row_max;
  acc_t* __restrict__ log_norm;
};

template <typename T> struct BwdParams {
  using acc_t = typename Acc<T>::type;
  const T* __restrict__ logits;
  const int64_t* __restrict__ labels;
  int64_t N, V, row_stride, ignore_index;
  acc_t inv_temp;
  const acc_t* __restrict__ row_max;
  const acc_t* __restrict__ log_norm;
  const acc_t* __restrict__ entropy;       // null: zero
  const acc_t* __restrict__ grad_logp;     // null: zero
  const acc_t* __restrict__ grad_entropy;  // null: zero
  T* __restrict__ grad;
  int64_t grad_row_stride;
};

// A read-only 16-byte load: through the non-coherent cache on the device, a plain load when the
// header is compiled for the host.
FUSEDRL_HD uint4 load_vec(const uint4* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(p);
#else
  return *p;
#endif
}

// The softmax state of this thread's share of a row: elements cid, cid + cs, ... of the head and
// the tail, and vectors cid, cid + cs, ... of the body.
template <typename T>
FUSEDRL_HD LseState<typename Acc<T>::type> thread_row_state(const T* __restrict__ z, int64_t V,
                                                            const RowSplit& sp, int64_t cid, int64_t cs,
                                                            typename Acc<T>::type inv_temp) {
  using acc_t = typename Acc<T>::type;
  constexpr int64_t kVec = kVecBytes / int64_t(sizeof(T));
  LseState<acc_t> st = lse_empty<acc_t>();
  for (int64_t v = cid; v < sp.head; v += cs) st = lse_push(st, mul_rn(upcast(z[v]), inv_temp));
  const uint4* __restrict__ zv = reinterpret_cast<const uint4*>(z + sp.head);
  for (int64_t i = cid; i < sp.nvec; i += cs) {
    const uint4 u = load_vec(zv + i);
    T e[kVec];
    memcpy(e, &u, kVecBytes);
FUSEDRL_UNROLL
    for (int j = 0; j < kVec; ++j) st = lse_push(st, mul_rn(upcast(e[j]), inv_temp));
  }
  for (int64_t v = sp.tail0 + cid; v < V; v += cs) st = lse_push(st, mul_rn(upcast(z[v]), inv_temp));
  return st;
}

// Forward outputs of an ignored row: 0, 0, 0.
template <typename T> FUSEDRL_HD void fwd_store_ignored(const FwdParams<T>& p, int64_t r) {
  using acc_t = typename Acc<T>::type;
  p.logp[r] = acc_t(0);
  if (p.entropy) p.entropy[r] = acc_t(0);
  p.row_max[r] = acc_t(0);
  p.log_norm[r] = acc_t(0);
}

// Forward outputs of a row from its merged state. A NaN anywhere in the row is carried in st.s
// (lse_push / lse_merge), so log_norm, logp and entropy are NaN, as in the CPU kernel.
template <typename T>
FUSEDRL_HD void fwd_store(const FwdParams<T>& p, int64_t r, const T* z, int64_t label,
                          const LseState<typename Acc<T>::type>& st) {
  using acc_t = typename Acc<T>::type;
  const acc_t log_norm = log_norm_value(st);
  p.row_max[r] = st.m;
  p.log_norm[r] = log_norm;
  p.logp[r] = logprob_value(mul_rn(upcast(z[label]), p.inv_temp), st.m, log_norm);
  if (p.entropy) p.entropy[r] = entropy_value(st);
}

// Merges the states of the 32 lanes of a warp; every lane ends with the merged state. All 32 lanes
// must call it (full mask).
template <typename acc_t> __device__ __forceinline__ LseState<acc_t> warp_merge(LseState<acc_t> st) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    LseState<acc_t> o;
    o.m = __shfl_xor_sync(kFullMask, st.m, off);
    o.s = __shfl_xor_sync(kFullMask, st.s, off);
    o.t = __shfl_xor_sync(kFullMask, st.t, off);
    st = lse_merge(st, o);
  }
  return st;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) logprobs_fwd_kernel(const FwdParams<T> p) {
  using acc_t = typename Acc<T>::type;
  __shared__ LseState<acc_t> warp_states[kWarps];
  const int tid = int(threadIdx.x), lane = tid & 31, warp = tid >> 5;

  for (int64_t r = blockIdx.x; r < p.N; r += gridDim.x) {  // r is uniform across the block
    const int64_t label = p.labels[r];
    if (label == p.ignore_index) {  // uniform too: no thread reaches the barriers below
      if (tid == 0) fwd_store_ignored(p, r);
      continue;
    }
    const T* __restrict__ z = p.logits + r * p.row_stride;
    const RowSplit sp = row_split<T>(reinterpret_cast<uintptr_t>(z), p.V);

    LseState<acc_t> st = thread_row_state(z, p.V, sp, tid, kThreads, p.inv_temp);

    // Block merge: warps, then the kWarps warp states in warp 0.
    st = warp_merge(st);
    if (lane == 0) warp_states[warp] = st;
    __syncthreads();
    if (warp == 0) {  // the whole warp 0: the full shuffle mask holds
      st = lane < kWarps ? warp_states[lane] : lse_empty<acc_t>();
      st = warp_merge(st);
      if (lane == 0) fwd_store(p, r, z, label, st);
    }
    __syncthreads();  // warp_states is rewritten for the next row
  }
}

// Writes g[v] = f(v, x_v) over this thread's share of a row (x_v = the upcast logit, or 0 without
// reading the logits when Read is false). cid / cs: this thread's column index and the stride.
template <bool Read, typename T, typename F>
FUSEDRL_HD void map_row(const T* __restrict__ z, T* __restrict__ g, const RowSplit& sp, int64_t V,
                        int64_t cid, int64_t cs, F f) {
  using acc_t = typename Acc<T>::type;
  constexpr int64_t kVec = kVecBytes / int64_t(sizeof(T));
  for (int64_t v = cid; v < sp.head; v += cs) g[v] = downcast<T>(f(v, Read ? upcast(z[v]) : acc_t(0)));
  const uint4* __restrict__ zv = reinterpret_cast<const uint4*>(z + sp.head);
  uint4* __restrict__ gv = reinterpret_cast<uint4*>(g + sp.head);
  for (int64_t i = cid; i < sp.nvec; i += cs) {
    const int64_t v0 = sp.head + i * kVec;
    T o[kVec];
    if (Read) {
      const uint4 u = load_vec(zv + i);
      T e[kVec];
      memcpy(e, &u, kVecBytes);
FUSEDRL_UNROLL
      for (int j = 0; j < kVec; ++j) o[j] = downcast<T>(f(v0 + j, upcast(e[j])));
    } else {
FUSEDRL_UNROLL
      for (int j = 0; j < kVec; ++j) o[j] = downcast<T>(f(v0 + j, acc_t(0)));
    }
    uint4 w;
    memcpy(&w, o, kVecBytes);
    gv[i] = w;
  }
  for (int64_t v = sp.tail0 + cid; v < V; v += cs) g[v] = downcast<T>(f(v, Read ? upcast(z[v]) : acc_t(0)));
}

// This thread's share (columns cid, cid + cs, ...) of row r of the gradient.
template <typename T> FUSEDRL_HD void bwd_row(const BwdParams<T>& p, int64_t r, int64_t cid, int64_t cs) {
  using acc_t = typename Acc<T>::type;
  const T* __restrict__ z = p.logits + r * p.row_stride;
  T* __restrict__ g = p.grad + r * p.grad_row_stride;
  const RowSplit sp = row_split2<T>(reinterpret_cast<uintptr_t>(z), reinterpret_cast<uintptr_t>(g), p.V);
  const int64_t label = p.labels[r];
  const acc_t g_lp = p.grad_logp ? p.grad_logp[r] : acc_t(0);
  const acc_t g_h = p.grad_entropy ? p.grad_entropy[r] : acc_t(0);
  if (label == p.ignore_index || (g_lp == acc_t(0) && g_h == acc_t(0))) {
    map_row<false>(z, g, sp, p.V, cid, cs, [](int64_t, acc_t) { return acc_t(0); });
    return;
  }
  const acc_t m = p.row_max[r], log_norm = p.log_norm[r];
  const acc_t h = p.entropy ? p.entropy[r] : acc_t(0);
  const acc_t inv_temp = p.inv_temp;
  map_row<true>(z, g, sp, p.V, cid, cs, [=](int64_t v, acc_t zv) {
    return logprob_grad(mul_rn(zv, inv_temp), m, log_norm, h, v == label, g_lp, g_h, inv_temp);
  });
}

template <typename T>
__global__ void __launch_bounds__(kThreads) logprobs_bwd_kernel(const BwdParams<T> p) {
  const int64_t cid = int64_t(blockIdx.y) * kThreads + threadIdx.x;
  const int64_t cs = int64_t(gridDim.y) * kThreads;

  for (int64_t r = blockIdx.x; r < p.N; r += gridDim.x) bwd_row(p, r, cid, cs);
}

const char* launch_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Backward column blocks (grid.y): enough to cover V with one vector per thread, but only as many
// as it takes to reach about kBwdTargetBlocks blocks in all (many rows: one block per row, looping
// over V). Always in [1, 65535].
int64_t bwd_col_blocks(int64_t N, int64_t V, int64_t vec) {
  const int64_t col_blocks = std::min(ceil_div(V, int64_t(kThreads) * vec), ceil_div(kBwdTargetBlocks, N));
  return std::max<int64_t>(1, std::min(col_blocks, kMaxGridY));
}

template <typename T> const char* launch_forward(const LogprobArgs& a, cudaStream_t stream) {
  using acc_t = typename Acc<T>::type;
  if (a.N <= 0) return nullptr;
  FwdParams<T> p;
  p.logits = static_cast<const T*>(a.logits);
  p.labels = a.labels;
  p.N = a.N;
  p.V = a.V;
  p.row_stride = a.row_stride;
  p.ignore_index = a.ignore_index;
  p.inv_temp = acc_t(a.inv_temp);
  p.logp = static_cast<acc_t*>(a.logp);
  p.entropy = static_cast<acc_t*>(a.entropy);
  p.row_max = static_cast<acc_t*>(a.row_max);
  p.log_norm = static_cast<acc_t*>(a.log_norm);
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(a.N, INT_MAX)));
  logprobs_fwd_kernel<T><<<grid, kThreads, 0, stream>>>(p);
  return launch_error();
}

template <typename T> const char* launch_backward(const LogprobArgs& a, cudaStream_t stream) {
  using acc_t = typename Acc<T>::type;
  if (a.N <= 0 || a.V <= 0) return nullptr;
  BwdParams<T> p;
  p.logits = static_cast<const T*>(a.logits);
  p.labels = a.labels;
  p.N = a.N;
  p.V = a.V;
  p.row_stride = a.row_stride;
  p.ignore_index = a.ignore_index;
  p.inv_temp = acc_t(a.inv_temp);
  p.row_max = static_cast<const acc_t*>(a.row_max);
  p.log_norm = static_cast<const acc_t*>(a.log_norm);
  p.entropy = static_cast<const acc_t*>(a.entropy);
  p.grad_logp = static_cast<const acc_t*>(a.grad_logp);
  p.grad_entropy = static_cast<const acc_t*>(a.grad_entropy);
  p.grad = static_cast<T*>(a.grad_logits);
  p.grad_row_stride = a.grad_row_stride;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(a.N, INT_MAX)),
                  static_cast<unsigned>(bwd_col_blocks(a.N, a.V, kVecBytes / int64_t(sizeof(T)))));
  logprobs_bwd_kernel<T><<<grid, kThreads, 0, stream>>>(p);
  return launch_error();
}

const char* kBadDtype = "fusedrl: unsupported dtype code";

}  // namespace

const char* logprobs_forward(const LogprobArgs& a, uintptr_t stream) {
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case kFloat32: return launch_forward<float>(a, s);
    case kBFloat16: return launch_forward<bf16_t>(a, s);
    case kFloat16: return launch_forward<f16_t>(a, s);
    case kFloat64: return launch_forward<double>(a, s);
    default: return kBadDtype;
  }
}

const char* logprobs_backward(const LogprobArgs& a, uintptr_t stream) {
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case kFloat32: return launch_backward<float>(a, s);
    case kBFloat16: return launch_backward<bf16_t>(a, s);
    case kFloat16: return launch_backward<f16_t>(a, s);
    case kFloat64: return launch_backward<double>(a, s);
    default: return kBadDtype;
  }
}

}  // namespace cuda
}  // namespace fusedrl

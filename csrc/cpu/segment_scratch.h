// The CPU segment kernels' host scratch (reused across calls by each calling thread), the CSR layout
// of dense ids and the keyed layout's per-group sums. Included by csrc/cpu/segment_stats.cpp and
// csrc/cpu/group_advantages.cpp (internal linkage: each keeps its own scratch).
#pragma once

#include <cstdint>
#include <vector>

#include "fusedrl/segments.h"

namespace fusedrl {
namespace cpu {
namespace {

// group_advantages' sums of one group over a slice of rows (keyed layout), C columns: the rows,
// then per column the shift (the group's first value), the sums of d = x - shift and of d^2, as
// 1 + 3C doubles {n, shift[C], s1[C], s2[C]} (one entry per group: a row's C columns update
// side by side; C = 1 is Sums).
struct Sums {
  double n, shift, s1, s2;
};
struct SumsRef {
  const double* e;
  int64_t C;
  FUSEDRL_HD double n() const { return e[0]; }
  FUSEDRL_HD double shift(int64_t c) const { return e[1 + c]; }
  FUSEDRL_HD double s1(int64_t c) const { return e[1 + C + c]; }
  FUSEDRL_HD double s2(int64_t c) const { return e[1 + 2 * C + c]; }
};

// Host scratch reused across calls by each calling thread: a fresh multi-page std::vector costs a
// page fault per 4 KiB on first touch (benchmarks/NOTES.md). Kept while its capacity is at most kKeepBytes, released after a
// bigger call.
struct Scratch {
  std::vector<int64_t> slot, keys, vals, offsets, order, next, ties, first;
  std::vector<double> acc, X, W, Y, mx, wsum, wx, below, gmax, inv, mean, second;
  std::vector<int32_t> number, kept;
  std::vector<uint8_t> seen;
  std::vector<SegmentMoments> mom;
  std::vector<SegmentResult> res;
  size_t bytes() const;
};
constexpr size_t kKeepBytes = size_t(64) << 20;

size_t Scratch::bytes() const {
  size_t b = seen.capacity() + 4 * (number.capacity() + kept.capacity()) + 8 * (slot.capacity() + keys.capacity() + vals.capacity() + offsets.capacity() +
                  order.capacity() + next.capacity() + ties.capacity() + first.capacity() +
                  X.capacity() + W.capacity() + Y.capacity() + acc.capacity() + mean.capacity() +
                  mx.capacity() + wsum.capacity() + wx.capacity() + below.capacity() + gmax.capacity() +
                  inv.capacity() + second.capacity());
  return b + sizeof(SegmentMoments) * mom.capacity() +
         sizeof(SegmentResult) * res.capacity();
}

Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

void release_if_big(Scratch& s) {
  if (s.bytes() > kKeepBytes) s = Scratch();
}

// The CSR layout of dense ids in [0, G): rows of group g at order[offsets[g] ..], in row order
// (a stable counting sort).
template <typename Id>
void csr(const Id* index, int64_t M, int64_t G, Scratch& s) {
  s.offsets.assign(G + 1, 0);
  s.order.resize(M > 0 ? M : 1);
  for (int64_t r = 0; r < M; ++r) ++s.offsets[index[r] + 1];
  for (int64_t g = 0; g < G; ++g) s.offsets[g + 1] += s.offsets[g];
  s.next.assign(s.offsets.begin(), s.offsets.end() - 1);
  for (int64_t r = 0; r < M; ++r) s.order[s.next[index[r]]++] = r;
}

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

}  // namespace
}  // namespace cpu
}  // namespace fusedrl

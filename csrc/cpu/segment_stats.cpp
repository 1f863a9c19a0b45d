// Segment (group) statistics on the CPU. Dense group ids are first sorted into a CSR layout by a
// stable counting sort (rows of a group in increasing row order); contiguous fixed-size groups
// need none. Groups are then spread over OpenMP threads, each group reduced sequentially by one
// thread, so the results do not depend on the thread count. The per-group math is
// fusedrl/segments.h, shared with the CUDA kernel.
#include "fusedrl/segments_args.h"
#include "cpu/isa.h"

#include <algorithm>
#include <vector>
#include <omp.h>

#include "cpu/segment_scratch.h"
#include "fusedrl/segments.h"

namespace fusedrl {
namespace cpu {
namespace {

template <typename T>
FUSEDRL_HD void group_rows(const SegmentArgs& a, int64_t g0, int64_t g1) {
  for (int64_t g = g0; g < g1; ++g) segment_group<T, typename Acc<T>::type>(a, g);
}

using GroupsFn = void (*)(const SegmentArgs&, int64_t, int64_t);

FUSEDRL_ISA_VARIANTS(groups_f32, SegmentArgs, group_rows, float)
FUSEDRL_ISA_VARIANTS(groups_bf16, SegmentArgs, group_rows, bf16_t)
FUSEDRL_ISA_VARIANTS(groups_f16, SegmentArgs, group_rows, f16_t)
FUSEDRL_ISA_VARIANTS(groups_f64, SegmentArgs, group_rows, double)

const GroupsFn kGroups[4] = {groups_f32(), groups_bf16(), groups_f16(), groups_f64()};

}  // namespace

bool segment_stats(const SegmentArgs& in) {
  if (in.dtype < 0 || in.dtype > 3) return false;
  const GroupsFn fn = kGroups[in.dtype];
  SegmentArgs a = in;
  const int64_t G = a.G, M = a.M;
  if (G <= 0) return true;
  Scratch& sc = scratch();
  if (a.index) {
    csr(a.index, M, G, sc);
    a.offsets = sc.offsets.data();
    a.order = sc.order.data();
  }
  // The split only decides which thread reduces which group: the results do not depend on it.
  const int64_t work = M * (a.C > 0 ? a.C : 1);
  const int64_t want = std::max<int64_t>(1, std::min<int64_t>(a.num_threads, work / 8192));
  const int nt = static_cast<int>(std::min<int64_t>(want, G));
  if (nt == 1) {
    fn(a, 0, G);
  } else {
#pragma omp parallel num_threads(nt)
    {
      const int64_t tid = omp_get_thread_num(), cnt = omp_get_num_threads();
      fn(a, G * tid / cnt, G * (tid + 1) / cnt);
    }
  }
  release_if_big(sc);
  return true;
}

}  // namespace cpu
}  // namespace fusedrl

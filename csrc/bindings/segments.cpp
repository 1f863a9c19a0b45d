// Bindings of the segment-statistics kernels (csrc/cpu/segments.cpp, csrc/cuda/segments.cu).
#include "bindings/common.h"
#include "fusedrl/segments_args.h"

#include <pybind11/stl.h>

#include <vector>

namespace fusedrl {
namespace bind {
namespace {

SegmentArgs make_args(uintptr_t values, int dtype, int64_t M, int64_t C, int64_t row_stride, int64_t col_stride,
                      uintptr_t index, int64_t group_size, int64_t G, uintptr_t weight, int singleton,
                      uintptr_t count, uintptr_t mean, uintptr_t var, uintptr_t std, uintptr_t loo, uintptr_t max,
                      uintptr_t second, uintptr_t argmax, uintptr_t wmean) {
  SegmentArgs a;
  a.values = ptr<const void>(values);
  a.dtype = dtype;
  a.M = M;
  a.C = C;
  a.row_stride = row_stride;
  a.col_stride = col_stride;
  a.index = ptr<const int64_t>(index);
  a.group_size = group_size;
  a.G = G;
  a.weight = ptr<const void>(weight);
  a.singleton = singleton;
  a.count = ptr<void>(count);
  a.mean = ptr<void>(mean);
  a.var = ptr<void>(var);
  a.std = ptr<void>(std);
  a.loo = ptr<void>(loo);
  a.max = ptr<void>(max);
  a.second = ptr<void>(second);
  a.argmax = ptr<int64_t>(argmax);
  a.wmean = ptr<void>(wmean);
  return a;
}

}  // namespace

void segments(py::module_& m) {
  m.def(
      "segment_stats_cpu",
      [](uintptr_t values, int dtype, int64_t M, int64_t C, int64_t row_stride, int64_t col_stride, uintptr_t index,
         int64_t group_size, int64_t G, uintptr_t weight, int singleton, uintptr_t count, uintptr_t mean,
         uintptr_t var, uintptr_t std, uintptr_t loo, uintptr_t max, uintptr_t second, uintptr_t argmax,
         uintptr_t wmean, int64_t num_threads) {
        SegmentArgs a = make_args(values, dtype, M, C, row_stride, col_stride, index, group_size, G, weight, singleton,
                                  count, mean, var, std, loo, max, second, argmax, wmean);
        a.num_threads = num_threads;
        check(fusedrl::cpu::segment_stats(a), "segment_stats_cpu");
      },
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "group_advantages_cpu",
      [](uintptr_t values, int dtype, int64_t M, int64_t K, int64_t row_stride, int64_t col_stride, uintptr_t ids,
         bool ids_int32, int64_t ids_stride, int64_t group_size, uintptr_t weight, int estimator, int scale,
         int singleton, int combine, int finish, double eps, double var_coef, std::vector<double> weights,
         std::vector<double> ideal, uintptr_t out, int64_t num_threads) {
        GroupAdvantageArgs a;
        a.values = ptr<const void>(values);
        a.dtype = dtype;
        a.M = M;
        a.K = K;
        a.row_stride = row_stride;
        a.col_stride = col_stride;
        a.ids = ptr<const void>(ids);
        a.ids_int32 = ids_int32;
        a.ids_stride = ids_stride;
        a.group_size = group_size;
        a.weight = ptr<const void>(weight);
        a.estimator = estimator;
        a.scale = scale;
        a.singleton = singleton;
        a.combine = combine;
        a.finish = finish;
        a.eps = eps;
        a.var_coef = var_coef;
        a.weights = weights.empty() ? nullptr : weights.data();
        a.ideal = ideal.empty() ? nullptr : ideal.data();
        a.out = ptr<void>(out);
        a.num_threads = num_threads;
        return fusedrl::cpu::group_advantages(a);
      },
      py::call_guard<py::gil_scoped_release>());

#if defined(FUSEDRL_WITH_CUDA)
  m.def(
      "segment_stats_cuda",
      [](uintptr_t values, int dtype, int64_t M, int64_t C, int64_t row_stride, int64_t col_stride, uintptr_t index,
         int64_t group_size, int64_t G, uintptr_t weight, int singleton, uintptr_t count, uintptr_t mean,
         uintptr_t var, uintptr_t std, uintptr_t loo, uintptr_t max, uintptr_t second, uintptr_t argmax,
         uintptr_t wmean, uintptr_t offsets, uintptr_t order, uintptr_t stream) {
        SegmentArgs a = make_args(values, dtype, M, C, row_stride, col_stride, index, group_size, G, weight, singleton,
                                  count, mean, var, std, loo, max, second, argmax, wmean);
        a.offsets = ptr<const int64_t>(offsets);
        a.order = ptr<const int64_t>(order);
        check_cuda(fusedrl::cuda::segment_stats(a, stream), "segment_stats_cuda");
      },
      py::call_guard<py::gil_scoped_release>());
#endif
}

}  // namespace bind
}  // namespace fusedrl

// Bindings of the scan kernels (csrc/cpu/scan.cpp, csrc/cuda/scan.cu): GAE / discounted returns
// (one reverse scan) and the masked prefix sum.
#include "bindings/common.h"
#include "fusedrl/scan_args.h"

namespace fusedrl {
namespace bind {
namespace {

ScanArgs make_args(uintptr_t x, uintptr_t values, uintptr_t mask, uintptr_t bootstrap, int dtype, int mask_code,
                   int64_t B, int64_t T, int64_t x_stride, int64_t values_stride, int64_t mask_stride, double gamma,
                   double lam, uintptr_t out, uintptr_t returns, bool whiten, uintptr_t workspace) {
  ScanArgs a;
  a.x = ptr<const void>(x);
  a.values = ptr<const void>(values);
  a.mask = ptr<const void>(mask);
  a.bootstrap = ptr<const void>(bootstrap);
  a.dtype = dtype;
  a.mask_code = mask_code;
  a.B = B;
  a.T = T;
  a.x_stride = x_stride;
  a.values_stride = values_stride;
  a.mask_stride = mask_stride;
  a.gamma = gamma;
  a.lam = lam;
  a.out = ptr<void>(out);
  a.returns = ptr<void>(returns);
  a.whiten = whiten;
  a.workspace = ptr<void>(workspace);
  return a;
}

}  // namespace

void scan(py::module_& m) {
  m.def(
      "reverse_scan_cpu",
      [](uintptr_t x, uintptr_t values, uintptr_t mask, uintptr_t bootstrap, int dtype, int mask_code, int64_t B,
         int64_t T, int64_t x_stride, int64_t values_stride, int64_t mask_stride, double gamma, double lam,
         uintptr_t out, uintptr_t returns, bool whiten, uintptr_t workspace, int64_t num_threads) {
        ScanArgs a = make_args(x, values, mask, bootstrap, dtype, mask_code, B, T, x_stride, values_stride,
                               mask_stride, gamma, lam, out, returns, whiten, workspace);
        a.num_threads = num_threads;
        check(fusedrl::cpu::reverse_scan(a), "reverse_scan_cpu");
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "prefix_sum_cpu",
      [](uintptr_t x, uintptr_t mask, int dtype, int mask_code, int64_t B, int64_t T, int64_t x_stride,
         int64_t mask_stride, uintptr_t out, int64_t num_threads) {
        ScanArgs a = make_args(x, 0, mask, 0, dtype, mask_code, B, T, x_stride, 0, mask_stride, 1.0, 1.0, out, 0,
                               false, 0);
        a.num_threads = num_threads;
        check(fusedrl::cpu::prefix_sum(a), "prefix_sum_cpu");
      },
      py::call_guard<py::gil_scoped_release>());
#if defined(FUSEDRL_WITH_CUDA)
  m.def(
      "reverse_scan_cuda",
      [](uintptr_t x, uintptr_t values, uintptr_t mask, uintptr_t bootstrap, int dtype, int mask_code, int64_t B,
         int64_t T, int64_t x_stride, int64_t values_stride, int64_t mask_stride, double gamma, double lam,
         uintptr_t out, uintptr_t returns, bool whiten, uintptr_t workspace, uintptr_t stream) {
        ScanArgs a = make_args(x, values, mask, bootstrap, dtype, mask_code, B, T, x_stride, values_stride,
                               mask_stride, gamma, lam, out, returns, whiten, workspace);
        check_cuda(fusedrl::cuda::reverse_scan(a, stream), "reverse_scan_cuda");
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "prefix_sum_cuda",
      [](uintptr_t x, uintptr_t mask, int dtype, int mask_code, int64_t B, int64_t T, int64_t x_stride,
         int64_t mask_stride, uintptr_t out, uintptr_t stream) {
        ScanArgs a = make_args(x, 0, mask, 0, dtype, mask_code, B, T, x_stride, 0, mask_stride, 1.0, 1.0, out, 0,
                               false, 0);
        check_cuda(fusedrl::cuda::prefix_sum(a, stream), "prefix_sum_cuda");
      },
      py::call_guard<py::gil_scoped_release>());
#endif
}

}  // namespace bind
}  // namespace fusedrl

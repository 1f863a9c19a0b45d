// Bindings of the token log-prob kernels (csrc/cpu/logprobs.cpp, csrc/cuda/logprobs.cu).
#include "bindings/common.h"
#include "fusedrl/logprobs_args.h"

namespace fusedrl {
namespace bind {
namespace {

LogprobArgs make_args(uintptr_t logits, uintptr_t labels, int dtype, int64_t N, int64_t V,
                      int64_t row_stride, int64_t ignore_index, double inv_temp) {
  LogprobArgs a;
  a.logits = reinterpret_cast<const void*>(logits);
  a.labels = reinterpret_cast<const int64_t*>(labels);
  a.dtype = dtype;
  a.N = N;
  a.V = V;
  a.row_stride = row_stride;
  a.ignore_index = ignore_index;
  a.inv_temp = inv_temp;
  return a;
}

}  // namespace

void logprobs(py::module_& m) {
  m.def(
      "logprobs_forward_cpu",
      [](uintptr_t logits, uintptr_t labels, int dtype, int64_t N, int64_t V, int64_t row_stride,
         int64_t ignore_index, double inv_temp, uintptr_t logp, uintptr_t entropy, uintptr_t row_max, uintptr_t log_norm,
         int64_t num_threads) {
        LogprobArgs a = make_args(logits, labels, dtype, N, V, row_stride, ignore_index, inv_temp);
        a.logp = ptr<void>(logp);
        a.entropy = ptr<void>(entropy);
        a.row_max = ptr<void>(row_max);
        a.log_norm = ptr<void>(log_norm);
        a.num_threads = num_threads;
        check(fusedrl::cpu::logprobs_forward(a), "logprobs_forward_cpu");
      },
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "logprobs_backward_cpu",
      [](uintptr_t logits, uintptr_t labels, int dtype, int64_t N, int64_t V, int64_t row_stride,
         int64_t ignore_index, double inv_temp, uintptr_t row_max, uintptr_t log_norm, uintptr_t entropy,
         uintptr_t grad_logp, uintptr_t grad_entropy, uintptr_t grad_logits,
         int64_t grad_row_stride, int64_t num_threads) {
        LogprobArgs a = make_args(logits, labels, dtype, N, V, row_stride, ignore_index, inv_temp);
        a.row_max = ptr<void>(row_max);
        a.log_norm = ptr<void>(log_norm);
        a.entropy = ptr<void>(entropy);
        a.grad_logp = ptr<const void>(grad_logp);
        a.grad_entropy = ptr<const void>(grad_entropy);
        a.grad_logits = ptr<void>(grad_logits);
        a.grad_row_stride = grad_row_stride;
        a.num_threads = num_threads;
        check(fusedrl::cpu::logprobs_backward(a), "logprobs_backward_cpu");
      },
      py::call_guard<py::gil_scoped_release>());

#if defined(FUSEDRL_WITH_CUDA)
  m.def(
      "logprobs_forward_cuda",
      [](uintptr_t logits, uintptr_t labels, int dtype, int64_t N, int64_t V, int64_t row_stride,
         int64_t ignore_index, double inv_temp, uintptr_t logp, uintptr_t entropy, uintptr_t row_max, uintptr_t log_norm,
         uintptr_t stream) {
        LogprobArgs a = make_args(logits, labels, dtype, N, V, row_stride, ignore_index, inv_temp);
        a.logp = ptr<void>(logp);
        a.entropy = ptr<void>(entropy);
        a.row_max = ptr<void>(row_max);
        a.log_norm = ptr<void>(log_norm);
        check_cuda(fusedrl::cuda::logprobs_forward(a, stream), "logprobs_forward_cuda");
      },
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "logprobs_backward_cuda",
      [](uintptr_t logits, uintptr_t labels, int dtype, int64_t N, int64_t V, int64_t row_stride,
         int64_t ignore_index, double inv_temp, uintptr_t row_max, uintptr_t log_norm, uintptr_t entropy,
         uintptr_t grad_logp, uintptr_t grad_entropy, uintptr_t grad_logits,
         int64_t grad_row_stride, uintptr_t stream) {
        LogprobArgs a = make_args(logits, labels, dtype, N, V, row_stride, ignore_index, inv_temp);
        a.row_max = ptr<void>(row_max);
        a.log_norm = ptr<void>(log_norm);
        a.entropy = ptr<void>(entropy);
        a.grad_logp = ptr<const void>(grad_logp);
        a.grad_entropy = ptr<const void>(grad_entropy);
        a.grad_logits = ptr<void>(grad_logits);
        a.grad_row_stride = grad_row_stride;
        check_cuda(fusedrl::cuda::logprobs_backward(a, stream), "logprobs_backward_cuda");
      },
      py::call_guard<py::gil_scoped_release>());
#endif
}

}  // namespace bind
}  // namespace fusedrl

// pybind11 module fusedrl._C: torch-free entry points taking data pointers, sizes, strides and a
// dtype code (and a stream handle for CUDA). Python (python/fusedrl/ops) validates everything first.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "cpu/isa.h"
#include "cpu/kernels.h"

namespace py = pybind11;
using fusedrl::LogprobArgs;

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

template <typename T> T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

void check(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(std::string(what) + ": unsupported dtype code");
}

#if defined(FUSEDRL_WITH_CUDA)
void check_cuda(const char* err, const char* what) {
  if (err) throw std::runtime_error(std::string(what) + ": " + err);
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fusedrl kernels (torch-free entry points; see python/fusedrl/ops)";
#if defined(FUSEDRL_WITH_CUDA)
  m.attr("cuda_compiled") = true;
#else
  m.attr("cuda_compiled") = false;
#endif

  m.def("cpu_isa", &fusedrl::cpu::isa_name, "The instruction set the CPU kernels run with here.");

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

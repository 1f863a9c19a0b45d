// Bindings of the clipped value loss (csrc/cpu/value.cpp, csrc/cuda/value.cu). Operands come as
// (pointer, dtype code, row stride, token stride) tuples and the options as two flat lists whose
// order is the X-macros' of fusedrl/value.h (python/fusedrl/ops/value.py packs them by name).
#include <pybind11/stl.h>

#include <string>
#include <tuple>
#include <vector>

#include "bindings/common.h"
#include "fusedrl/value_args.h"

namespace fusedrl {
namespace bind {
namespace {

using ViewTuple = std::tuple<uintptr_t, int, int64_t, int64_t>;
using Views = std::vector<ViewTuple>;  // values, old_values, returns, mask, grad

View value_view(const ViewTuple& t) {
  View v;
  v.p = ptr<const void>(std::get<0>(t));
  v.dtype = std::get<1>(t);
  v.s_row = std::get<2>(t);
  v.s_tok = std::get<3>(t);
  return v;
}

// The Options from the two lists (python/fusedrl/ops/value.py packs them by name).
FUSEDRL_OPTION_BINDING(value::Options, FUSEDRL_VALUE_INT_OPTIONS, FUSEDRL_VALUE_FLOAT_OPTIONS, options, option_names,
                       "value")

ValueArgs make_value_args(const Views& v, uintptr_t cu_seqlens, int64_t B, int64_t T, const std::vector<int64_t>& f,
                          const std::vector<double>& d, uintptr_t coef, uintptr_t rows) {
  if (v.size() != 5) throw std::invalid_argument("value: expected 5 operand views");
  ValueArgs a;
  a.values = value_view(v[0]);
  a.old_values = value_view(v[1]);
  a.returns = value_view(v[2]);
  a.mask = value_view(v[3]);
  a.grad = value_view(v[4]);
  a.cu_seqlens = ptr<const int64_t>(cu_seqlens);
  a.B = B;
  a.T = T;
  a.opt = options(f, d);
  a.coef = ptr<const double>(coef);
  a.rows = ptr<double>(rows);
  return a;
}

}  // namespace

void value(py::module_& m) {
  m.def("value_option_names", &option_names);
  m.def(
      "value_loss_cpu",
      [](const Views& v, uintptr_t cu, int64_t B, int64_t T, const std::vector<int64_t>& flags,
         const std::vector<double>& values, uintptr_t coef, uintptr_t rows, int64_t num_threads) {
        ValueArgs a = make_value_args(v, cu, B, T, flags, values, coef, rows);
        a.num_threads = num_threads;
        check(fusedrl::cpu::value_loss(a), "value_loss_cpu");
      },
      py::call_guard<py::gil_scoped_release>());
#if defined(FUSEDRL_WITH_CUDA)
  m.def(
      "value_loss_cuda",
      [](const Views& v, uintptr_t cu, int64_t B, int64_t T, const std::vector<int64_t>& flags,
         const std::vector<double>& values, uintptr_t coef, uintptr_t rows, uintptr_t stream) {
        ValueArgs a = make_value_args(v, cu, B, T, flags, values, coef, rows);
        check_cuda(fusedrl::cuda::value_loss(a, stream), "value_loss_cuda");
      },
      py::call_guard<py::gil_scoped_release>());
#endif
}

}  // namespace bind
}  // namespace fusedrl

// Bindings of the fused policy objective (csrc/cpu/policy.cpp, csrc/cuda/policy.cu). Operands come
// as (pointer, dtype code, row stride, token stride) tuples and the options as two flat lists in the
// order of the option macros of fusedrl/policy.h (policy_option_names tells Python that order).
#include <pybind11/stl.h>

#include <string>
#include <tuple>
#include <vector>

#include "bindings/common.h"
#include "fusedrl/policy_args.h"

namespace fusedrl {
namespace bind {
namespace {

using ViewTuple = std::tuple<uintptr_t, int, int64_t, int64_t>;
using Views = std::vector<ViewTuple>;  // logp, old, adv, mask, ref, rollout, entropy, grad_logp, grad_entropy

View view(const ViewTuple& t) {
  View v;
  v.p = ptr<const void>(std::get<0>(t));
  v.dtype = std::get<1>(t);
  v.s_row = std::get<2>(t);
  v.s_tok = std::get<3>(t);
  return v;
}

// The Options from the two lists (python/fusedrl/ops/policy.py packs them by name).
FUSEDRL_OPTION_BINDING(policy::Options, FUSEDRL_POLICY_INT_OPTIONS, FUSEDRL_POLICY_FLOAT_OPTIONS, options, option_names,
                       "policy")

PolicyArgs make_args(const Views& v, uintptr_t cu_seqlens, int64_t B, int64_t T, const std::vector<int64_t>& flags,
                     const std::vector<double>& values, uintptr_t stats, bool stats_adv, uintptr_t coef,
                     uintptr_t rows) {
  if (v.size() != 9) throw std::invalid_argument("policy: expected 9 operand views");
  PolicyArgs a;
  a.logp = view(v[0]);
  a.old_logp = view(v[1]);
  a.adv = view(v[2]);
  a.mask = view(v[3]);
  a.ref_logp = view(v[4]);
  a.rollout_logp = view(v[5]);
  a.entropy = view(v[6]);
  a.grad_logp = view(v[7]);
  a.grad_entropy = view(v[8]);
  a.cu_seqlens = ptr<const int64_t>(cu_seqlens);
  a.B = B;
  a.T = T;
  a.opt = options(flags, values);
  a.stats = ptr<double>(stats);
  a.stats_adv = stats_adv;
  a.coef = ptr<const double>(coef);
  a.rows = ptr<double>(rows);
  return a;
}

}  // namespace

void policy(py::module_& m) {
  m.def("policy_option_names", &option_names);
  m.def(
      "policy_stats_cpu",
      [](const Views& v, uintptr_t cu, int64_t B, int64_t T, const std::vector<int64_t>& flags,
         const std::vector<double>& values, uintptr_t stats, bool stats_adv, int64_t num_threads) {
        PolicyArgs a = make_args(v, cu, B, T, flags, values, stats, stats_adv, 0, 0);
        a.num_threads = num_threads;
        check(fusedrl::cpu::policy_stats(a), "policy_stats_cpu");
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "policy_loss_cpu",
      [](const Views& v, uintptr_t cu, int64_t B, int64_t T, const std::vector<int64_t>& flags,
         const std::vector<double>& values, uintptr_t stats, uintptr_t coef, uintptr_t rows, int64_t num_threads) {
        PolicyArgs a = make_args(v, cu, B, T, flags, values, stats, false, coef, rows);
        a.num_threads = num_threads;
        check(fusedrl::cpu::policy_loss(a), "policy_loss_cpu");
      },
      py::call_guard<py::gil_scoped_release>());
#if defined(FUSEDRL_WITH_CUDA)
  m.def(
      "policy_stats_cuda",
      [](const Views& v, uintptr_t cu, int64_t B, int64_t T, const std::vector<int64_t>& flags,
         const std::vector<double>& values, uintptr_t stats, bool stats_adv, uintptr_t stream) {
        PolicyArgs a = make_args(v, cu, B, T, flags, values, stats, stats_adv, 0, 0);
        check_cuda(fusedrl::cuda::policy_stats(a, stream), "policy_stats_cuda");
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "policy_loss_cuda",
      [](const Views& v, uintptr_t cu, int64_t B, int64_t T, const std::vector<int64_t>& flags,
         const std::vector<double>& values, uintptr_t stats, uintptr_t coef, uintptr_t rows, uintptr_t stream) {
        PolicyArgs a = make_args(v, cu, B, T, flags, values, stats, false, coef, rows);
        check_cuda(fusedrl::cuda::policy_loss(a, stream), "policy_loss_cuda");
      },
      py::call_guard<py::gil_scoped_release>());
#endif
}

}  // namespace bind
}  // namespace fusedrl

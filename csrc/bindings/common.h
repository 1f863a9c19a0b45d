// Helpers shared by the pybind11 binding files (one file per primitive, csrc/bindings/*.cpp).
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace fusedrl {
namespace bind {

namespace py = pybind11;

template <typename T> T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

inline void check(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(std::string(what) + ": unsupported dtype code");
}

inline void check_cuda(const char* err, const char* what) {
  if (err) throw std::runtime_error(std::string(what) + ": " + err);
}

// An op's options travel as two flat lists (integers, floats) in the order of its X-macros
// (INTS(X) / FLOATS(X), X(type, name, default): fusedrl/policy.h, fusedrl/value.h); Python packs
// them by name in the order *_option_names reports. These define, from the macros alone, the
// reader `Opt fn(ints, floats)` (wrong lengths throw, naming `what`; then Opt::resolve()) and the
// names function `names_fn()`.
#define FUSEDRL_READ_OPTION_INT(type, name, init) o.name = i < f.size() ? type(f[i]) : o.name, ++i;
#define FUSEDRL_READ_OPTION_FLOAT(type, name, init) o.name = j < d.size() ? type(d[j]) : o.name, ++j;
#define FUSEDRL_NAME_OPTION_INT(type, name, init) ints.push_back(#name);
#define FUSEDRL_NAME_OPTION_FLOAT(type, name, init) floats.push_back(#name);
#define FUSEDRL_OPTION_BINDING(Opt, INTS, FLOATS, fn, names_fn, what)                                   \
  Opt fn(const std::vector<int64_t>& f, const std::vector<double>& d) {                                \
    Opt o;                                                                                             \
    size_t i = 0, j = 0;                                                                               \
    INTS(FUSEDRL_READ_OPTION_INT)                                                                      \
    FLOATS(FUSEDRL_READ_OPTION_FLOAT)                                                                  \
    if (i != f.size() || j != d.size()) {                                                              \
      throw std::invalid_argument(std::string(what) + " options: expected " + std::to_string(i) +      \
                                  " integer and " + std::to_string(j) + " float values, got " +        \
                                  std::to_string(f.size()) + " and " + std::to_string(d.size()));      \
    }                                                                                                  \
    o.resolve();                                                                                       \
    return o;                                                                                          \
  }                                                                                                    \
  std::pair<std::vector<std::string>, std::vector<std::string>> names_fn() {                           \
    std::vector<std::string> ints, floats;                                                             \
    INTS(FUSEDRL_NAME_OPTION_INT)                                                                      \
    FLOATS(FUSEDRL_NAME_OPTION_FLOAT)                                                                  \
    return {ints, floats};                                                                             \
  }

// One registration function per primitive (csrc/bindings/<primitive>.cpp), called by module.cpp.
void logprobs(py::module_& m);
void scan(py::module_& m);
void segments(py::module_& m);
void policy(py::module_& m);
void value(py::module_& m);

}  // namespace bind
}  // namespace fusedrl

// Helpers shared by the pybind11 binding files (one file per primitive, csrc/bindings/*.cpp).
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

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

// One registration function per primitive (csrc/bindings/<primitive>.cpp), called by module.cpp.
void logprobs(py::module_& m);
void scan(py::module_& m);
void segments(py::module_& m);
void policy(py::module_& m);
void value(py::module_& m);

}  // namespace bind
}  // namespace fusedrl

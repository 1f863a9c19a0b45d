// pybind11 module fusedrl._C: torch-free entry points taking data pointers, sizes, strides and a
// dtype code (and a stream handle for CUDA). Python (python/fusedrl/ops) validates everything
// first. Each primitive registers its functions from its own file in csrc/bindings/.
#include "bindings/common.h"
#include "cpu/isa.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "fusedrl kernels (torch-free entry points; see python/fusedrl/ops)";
#if defined(FUSEDRL_WITH_CUDA)
  m.attr("cuda_compiled") = true;
#else
  m.attr("cuda_compiled") = false;
#endif
  m.def("cpu_isa", &fusedrl::cpu::isa_name, "The instruction set the CPU kernels run with here.");
  fusedrl::bind::logprobs(m);
  fusedrl::bind::scan(m);
  fusedrl::bind::segments(m);
  fusedrl::bind::policy(m);
  fusedrl::bind::value(m);
}

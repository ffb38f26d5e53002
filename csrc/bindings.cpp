// Python bindings for the native kernels. Only binding code lives here; kernels are in their own
// files and take raw pointers, element counts and dtype codes (csrc/dtype.h), never torch objects.
#include <pybind11/pybind11.h>
#include <omp.h>

namespace py = pybind11;

PYBIND11_MODULE(_native, m) {
  m.doc() = "fastmerge native CPU kernels (C++17, OpenMP)";
  m.def("max_threads", []() { return omp_get_max_threads(); },
        "Number of OpenMP threads a kernel will use.");
}

// fastmerge._cpu: the running CPU's features (cpu_features.h), for fastmerge/native_loader.py.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cpu_features.h"

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "The running CPU's instruction-set features (fastmerge/native_loader.py picks a build by them).";
  m.def(
      "supports",
      [](const std::string& feature) {
        const auto offered = fastmerge::cpu::supports(feature);
        if (!offered) throw pybind11::value_error("unknown CPU feature '" + feature + "'");
        return *offered;
      },
      pybind11::arg("feature"), "Whether this CPU and its OS offer `feature` (e.g. 'avx2'; on aarch64 'sve').");
  m.def("known_features", &fastmerge::cpu::known_features,
        "The features supports() can check: x86 and aarch64 Linux have lists, other targets none.");
}

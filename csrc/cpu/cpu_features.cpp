// fastmerge._cpu: which instruction-set features the running CPU (and its operating system)
// offers, for fastmerge/native_loader.py to pick a build of the kernels this CPU can run. Compiled
// without -march, so it runs on any CPU of its architecture, unlike the builds it chooses among.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <utility>
#include <vector>

namespace {

using Check = bool (*)();

// __builtin_cpu_supports takes only a string literal, hence one function per feature. Outside
// x86 GCC has no such builtin (and no build there records features), so the table is empty.
const std::vector<std::pair<const char*, Check>>& feature_table() {
  static const std::vector<std::pair<const char*, Check>> table = {
#if defined(__x86_64__) || defined(__i386__)
#include "feature_table.inc"
#endif
  };
  return table;
}

bool supports(const std::string& feature) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();  // idempotent; the builtins need it before constructors have run
#endif
  for (const auto& [name, check] : feature_table()) {
    if (feature == name) return check();
  }
  throw pybind11::value_error("unknown CPU feature '" + feature + "'");
}

std::vector<std::string> known_features() {
  std::vector<std::string> names;
  for (const auto& entry : feature_table()) names.emplace_back(entry.first);
  return names;
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "The running CPU's instruction-set features (fastmerge/native_loader.py picks a build by them).";
  m.def("supports", &supports, pybind11::arg("feature"),
        "Whether this CPU and its OS offer `feature` (__builtin_cpu_supports' name, e.g. 'avx2').");
  m.def("known_features", &known_features, "The features supports() can check, empty outside x86.");
}

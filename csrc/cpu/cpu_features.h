// Which instruction-set features the running CPU (and its operating system) offers, by the names
// CMakeLists.txt lists: __builtin_cpu_supports' on x86, the kernel's HWCAP names (as in
// /proc/cpuinfo) on aarch64 Linux. Compiled for its architecture's baseline (CMakeLists.txt), so
// it runs on any CPU of it, unlike the builds of the kernels that fastmerge/native_loader.py
// chooses among.
#pragma once

#include <optional>
#include <string>
#include <vector>

namespace fastmerge::cpu {

// Whether this CPU offers `feature`; nullopt for a name the table does not have.
std::optional<bool> supports(const std::string& feature);

// Every name supports() can check (empty where no list applies: other architectures, macOS).
std::vector<std::string> known_features();

}  // namespace fastmerge::cpu

#include "cpu_features.h"

#if defined(__aarch64__) && defined(__linux__)
#include <asm/hwcap.h>
#include <sys/auxv.h>
#endif

#include <utility>

namespace fastmerge::cpu {
namespace {

using Check = bool (*)();

// Generated from CMakeLists.txt's list for the target architecture: one function per feature,
// since __builtin_cpu_supports takes only a string literal.
const std::vector<std::pair<const char*, Check>>& feature_table() {
  static const std::vector<std::pair<const char*, Check>> table = {
#include "feature_table.inc"
  };
  return table;
}

}  // namespace

std::optional<bool> supports(const std::string& feature) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();  // idempotent; the builtins need it before constructors have run
#endif
  for (const auto& [name, check] : feature_table()) {
    if (feature == name) return check();
  }
  return std::nullopt;
}

std::vector<std::string> known_features() {
  std::vector<std::string> names;
  for (const auto& entry : feature_table()) names.emplace_back(entry.first);
  return names;
}

}  // namespace fastmerge::cpu

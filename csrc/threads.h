// The OpenMP runtime calls the kernels make, also for compilers without OpenMP (Apple's Clang,
// Clang without libomp): CMakeLists.txt then builds the kernels anyway, the compiler ignores their
// `#pragma omp` lines, and every kernel runs its work on one thread. Each parallel region splits
// its work by omp_get_num_threads() / omp_get_thread_num() and merges the parts in a fixed order,
// so one thread gives the same bytes as many (the thread-count tests), only slower.
#pragma once

#ifdef _OPENMP
#include <omp.h>
#else
inline int omp_get_max_threads() { return 1; }
inline int omp_get_num_threads() { return 1; }
inline int omp_get_thread_num() { return 0; }
inline void omp_set_num_threads(int) {}
#endif

namespace fastmerge {

// Whether this build runs its kernels on several threads (`fastmerge --version` says so).
constexpr bool kHasOpenMP =
#ifdef _OPENMP
    true;
#else
    false;
#endif

}  // namespace fastmerge

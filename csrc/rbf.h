// Squared pairwise distances for the RBF similarity (fastmerge/ops/rbf.py); see rbf.cpp.
#pragma once
#include <cstdint>

namespace fastmerge {

// D[l, i, j] = max(0, ||X[l,i]||^2 + ||Y[l,j]||^2 - 2 X[l,i].Y[l,j]) for contiguous fp64
// X [L, n, d], Y [L, m, d] and D [L, n, m]; every sum accumulates in fp64.
void rbf_sq_distances(uintptr_t x, uintptr_t y, int64_t layers, int64_t n, int64_t m, int64_t d, uintptr_t out);

}  // namespace fastmerge

// Weighted N-way blend (DESIGN.md "Arithmetic"); see blend.cpp.
#pragma once
#include <cstdint>
#include <vector>

namespace fastmerge {

// out[j] = sum_i w_i x_i[j] (times lam when lam != 1), or with a base b:
// out[j] = fma(lam, sum_i w_i (x_i[j] - b[j]), b[j]).  All pointers address n contiguous
// elements of the given dtype codes; base may be 0 (no base).
void blend(const std::vector<uintptr_t>& inputs, const std::vector<int>& input_dtypes,
           const std::vector<float>& weights, uintptr_t base, int base_dtype, float lam,
           uintptr_t out, int out_dtype, int64_t n);

}  // namespace fastmerge

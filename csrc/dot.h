// Gram matrix of K vectors (optionally base-subtracted) with fp64 accumulation; see dot.cpp.
#pragma once
#include <cstdint>
#include <vector>

namespace fastmerge {

// out[(i * K + j) * R + r] = <v_i, v_j> over fibre r, for K inputs of `outer * length * inner`
// contiguous elements (dtype codes as in dtype.h). Fibre r = o * inner + c holds the elements at
// offsets (o * length + d) * inner + c, d < length, so R = outer * inner: (1, n, 1) is one
// whole-tensor vector, (rows, cols, 1) the rows of a matrix, (1, rows, cols) its columns.
// v_i = x_i, or the fp32 difference x_i - base when base != 0. The products are exact in fp64;
// every sum has a fixed order (dot.cpp), so the result does not depend on the thread count.
void gram(const std::vector<uintptr_t>& inputs, const std::vector<int>& input_dtypes, uintptr_t base,
          int base_dtype, int64_t outer, int64_t length, int64_t inner, uintptr_t out);

}  // namespace fastmerge

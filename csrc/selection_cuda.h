// CUDA entry points of the magnitude selection (csrc/cuda/selection.cu); built and bound only
// with -DFASTMERGE_CUDA=ON (FASTMERGE_WITH_CUDA). Pointers are device addresses.
#pragma once
#include <cstdint>

namespace fastmerge {

// Adds |x - b|'s phase-1/phase-2 histogram into the device buffer hist (int64[65536]), exactly
// as magnitude_histogram in selection.h does on the CPU; returns the number of NaNs.
int64_t cuda_magnitude_histogram(uintptr_t x, int x_dtype, uintptr_t b, int b_dtype, int64_t n, uintptr_t hist,
                                 int phase, uint32_t bucket);

}  // namespace fastmerge

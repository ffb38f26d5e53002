// CUDA entry points of the magnitude selection (csrc/cuda/selection.cu); built and bound only
// with -DFASTMERGE_CUDA=ON (FASTMERGE_WITH_CUDA). Pointers are device addresses.
#pragma once
#include <cstdint>

namespace fastmerge {

// Queues on `stream` (a cudaStream_t of GPU `device`; 0 = legacy default) the addition of
// |x - b|'s phase-1 or phase-2 histogram into hist (device int64[65536]) and of the NaN count into
// nan_count (device int64[1]), exactly as magnitude_histogram in selection.h does on the CPU.
// Does not synchronise.
void cuda_magnitude_histogram(uintptr_t x, int x_dtype, uintptr_t b, int b_dtype, int64_t n, uintptr_t hist,
                              uintptr_t nan_count, int phase, uint32_t bucket, int device, uintptr_t stream);

}  // namespace fastmerge

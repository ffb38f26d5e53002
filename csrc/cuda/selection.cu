// CUDA magnitude histogram (the pass Triton expresses poorly: atomics into 65536 bins).
// Same contract as magnitude_histogram in csrc/selection.cpp: phase 1 bins the top 16 bits of the
// fp32 pattern of |x - b|, phase 2 the low 16 bits of the elements whose top 16 bits equal
// `bucket`; counts are integers, so atomics give the same histogram whatever the schedule.
// 65536 64-bit bins do not fit in shared memory, so both phases add straight into the global
// histogram (a device buffer of int64[65536]); L2 atomics keep that memory-bound.
//
// Nothing here synchronises or allocates: the kernel is queued on the caller's stream (torch's
// current stream) and the caller reads `hist` and `nan_count` back when it needs them.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "../selection_cuda.h"

namespace fastmerge {
namespace {

// Dtype codes of csrc/dtype.h (F32, F16, BF16, F8_E4M3, F8_E5M2); every conversion is exact.
__device__ __forceinline__ float load_any(const void* p, int dtype, int64_t i) {
  switch (dtype) {
    case 0: return static_cast<const float*>(p)[i];
    case 1: return __half2float(static_cast<const __half*>(p)[i]);
    case 2: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case 3: return float(static_cast<const __nv_fp8_e4m3*>(p)[i]);
    case 4: return float(static_cast<const __nv_fp8_e5m2*>(p)[i]);
  }
  return 0.f;
}

__global__ void histogram_kernel(const void* x, int x_dtype, const void* b, int b_dtype, int64_t n,
                                 unsigned long long* hist, unsigned long long* nan_count, int phase,
                                 uint32_t bucket) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    float d = load_any(x, x_dtype, i);
    if (b) d = __fsub_rn(d, load_any(b, b_dtype, i));
    const uint32_t bits = __float_as_uint(d) & 0x7fffffffu;
    if (bits > 0x7f800000u)
      atomicAdd(nan_count, 1ull);
    else if (phase == 1)
      atomicAdd(hist + (bits >> 16), 1ull);
    else if ((bits >> 16) == bucket)
      atomicAdd(hist + (bits & 0xffffu), 1ull);
  }
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

bool known_dtype(int dtype) { return dtype >= 0 && dtype <= 4; }

}  // namespace

void cuda_magnitude_histogram(uintptr_t x, int x_dtype, uintptr_t b, int b_dtype, int64_t n, uintptr_t hist,
                              uintptr_t nan_count, int phase, uint32_t bucket, int device, uintptr_t stream) {
  if (!known_dtype(x_dtype) || (b && !known_dtype(b_dtype)))
    throw std::invalid_argument("unknown input dtype code");
  if (phase != 1 && phase != 2) throw std::invalid_argument("histogram phase must be 1 or 2");
  if (n <= 0) return;
  // This module links its own (static) CUDA runtime, whose current device is not torch's: select
  // the device the pointers and the stream belong to.
  check(cudaSetDevice(device), "cudaSetDevice");
  const int threads = 256;
  const int64_t wanted = (n + threads - 1) / threads;
  const int blocks = int(wanted < 65535 ? wanted : 65535);  // grid-stride loop covers the rest
  histogram_kernel<<<blocks, threads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<const void*>(x), x_dtype, reinterpret_cast<const void*>(b), b_dtype, n,
      reinterpret_cast<unsigned long long*>(hist), reinterpret_cast<unsigned long long*>(nan_count), phase, bucket);
  check(cudaGetLastError(), "magnitude histogram kernel launch");
}

}  // namespace fastmerge

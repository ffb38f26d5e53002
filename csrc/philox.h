// Philox4x32-10 counter-based generator, bit-identical to Triton's tl.rand(seed, offset) and to
// fastmerge/ops/random.py (see that module for the exact definition and why counter-based).
// Header-only and constexpr-friendly so the CPU kernels and CUDA kernels share one definition.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FASTMERGE_HD __host__ __device__ __forceinline__
#else
#define FASTMERGE_HD inline
#endif

namespace fastmerge {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;

// First output word of Philox4x32-10 for key = (lo, hi) of `key` and counter = (lo, hi) of
// `offset`, 0, 0 (what tl.randint(key, offset) returns).
FASTMERGE_HD uint32_t philox_u32(uint64_t key, uint64_t offset) {
  uint32_t c0 = uint32_t(offset), c1 = uint32_t(offset >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = uint32_t(key), k1 = uint32_t(key >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t pb = uint64_t(kPhiloxRoundB) * c2;
    const uint64_t pa = uint64_t(kPhiloxRoundA) * c0;
    c0 = uint32_t(pb >> 32) ^ c1 ^ k0;
    c2 = uint32_t(pa >> 32) ^ c3 ^ k1;
    c1 = uint32_t(pb);
    c3 = uint32_t(pa);
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return c0;
}

// Triton's uint -> [0, 1) conversion: read as int32, invert negatives, fp32 multiply.
FASTMERGE_HD float philox_uniform(uint64_t key, uint64_t offset) {
  int32_t v = int32_t(philox_u32(key, offset));
  if (v < 0) v = ~v;
  return float(v) * 4.6566127342e-10f;
}

}  // namespace fastmerge

// Element masks (fastmerge/ops/mask.py documents the packed bit order); see mask.cpp.
#pragma once
#include <cstdint>
#include <cstring>
#if defined(__AVX512BW__)
#include <immintrin.h>
#endif

namespace fastmerge {

// out[i] = keep(i) ? round(x[i] * scale) : +0, in x's dtype (fp32/fp16/bf16). keep(i) is
// mask[i] != 0 for a dense byte mask, bit i % 8 of mask[i / 8] for a packed one.
// out may equal x (in place).
void apply_mask(uintptr_t x, int dtype, uintptr_t mask, bool packed, float scale, uintptr_t out, int64_t n);

// packed[i / 8] bit i % 8 = (dense[i] != 0); the padding bits of the last byte are 0.
void pack_mask(uintptr_t dense, int64_t n, uintptr_t packed);

// One byte of a packed mask: bit j = (v[j] != 0) for j < k <= 8, the other bits 0.
template <class T>
inline uint8_t pack_nonzero(const T* v, int64_t k) {
  uint8_t byte = 0;
  for (int64_t j = 0; j < k; ++j) byte |= uint8_t((v[j] != T(0)) << j);
  return byte;
}

// packed[j / 8] bit j % 8 = (v[j] != 0) for j < n, the padding bits of the last byte 0:
// pack_nonzero over a run, 64 elements at a time with AVX-512 where they are bytes (one test
// mask is 8 packed bytes, bit j of it element j, which a little-endian store puts in byte j / 8).
template <class T>
inline void pack_run(const T* v, int64_t n, uint8_t* packed) {
  int64_t j = 0;
#if defined(__AVX512BW__)
  if constexpr (sizeof(T) == 1)
    for (; j + 64 <= n; j += 64) {
      const __m512i bytes = _mm512_loadu_si512(v + j);
      const uint64_t bits = _mm512_test_epi8_mask(bytes, bytes);
      std::memcpy(packed + j / 8, &bits, 8);
    }
#endif
  for (; j < n; j += 8) packed[j / 8] = pack_nonzero(v + j, n - j < 8 ? n - j : 8);
}

// dense[i] = bit i % 8 of packed[i / 8] (as a 0/1 byte, i.e. a torch.bool).
void unpack_mask(uintptr_t packed, int64_t n, uintptr_t dense);

}  // namespace fastmerge

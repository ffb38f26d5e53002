// Native masking kernels. Element-wise, so OpenMP chunking cannot change any byte; chunks are
// multiples of 8 elements so a packed mask byte is never split between chunks. Inner loops are
// templated on the dtype (elem.h) so they vectorise.
#include "mask.h"

#include "dtype.h"
#include "elem.h"

namespace fastmerge {
namespace {

constexpr int64_t kChunk = 1 << 14;  // elements per OpenMP work item (a multiple of 8)

// out[i] = bit i % 8 of packed[i / 8] for i < n, written byte by byte so the compiler
// unrolls the 8 shifts of each byte into vector code.
inline void expand_bits(const uint8_t* __restrict packed, int64_t n, uint8_t* __restrict out) {
  const int64_t full = n / 8;
  for (int64_t b = 0; b < full; ++b)
    for (int j = 0; j < 8; ++j) out[8 * b + j] = (packed[b] >> j) & 1u;
  for (int64_t i = 8 * full; i < n; ++i) out[i] = (packed[i >> 3] >> (i & 7)) & 1u;
}

}  // namespace

void apply_mask(uintptr_t x, int dtype, uintptr_t mask, bool packed, float scale, uintptr_t out, int64_t n) {
  check_output_dtype(dtype);
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mask);
  const int64_t n_chunks = (n + kChunk - 1) / kChunk;
  dispatch_float_dtype(dtype, [&](auto tag) {
    using E = Elem<decltype(tag)::value>;
    const typename E::T* src = reinterpret_cast<const typename E::T*>(x);
    typename E::T* dst = reinterpret_cast<typename E::T*>(out);
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < n_chunks; ++c) {
      const int64_t begin = c * kChunk, len = n - begin < kChunk ? n - begin : kChunk;
      // A packed chunk is first expanded to one byte per element (chunks start on a byte
      // boundary), so both forms share the branch-free select below, which vectorises;
      // E::put(0.0f) is +0 in every dtype.
      alignas(64) uint8_t expanded[kChunk];
      const uint8_t* keep = m + begin;
      if (packed) {
        expand_bits(m + begin / 8, len, expanded);
        keep = expanded;
      }
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        const float v = E::get(src[begin + j]) * scale;
        dst[begin + j] = E::put(keep[j] ? v : 0.0f);
      }
    }
  });
}

void pack_mask(uintptr_t dense, int64_t n, uintptr_t packed) {
  const uint8_t* d = reinterpret_cast<const uint8_t*>(dense);
  uint8_t* p = reinterpret_cast<uint8_t*>(packed);
  const int64_t n_chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t begin = c * kChunk;
    pack_run(d + begin, n - begin < kChunk ? n - begin : kChunk, p + begin / 8);
  }
}

void unpack_mask(uintptr_t packed, int64_t n, uintptr_t dense) {
  const uint8_t* p = reinterpret_cast<const uint8_t*>(packed);
  uint8_t* d = reinterpret_cast<uint8_t*>(dense);
  const int64_t n_chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t begin = c * kChunk, len = n - begin < kChunk ? n - begin : kChunk;
    expand_bits(p + begin / 8, len, d + begin);
  }
}

}  // namespace fastmerge

// Native masking kernels. Element-wise, so OpenMP chunking cannot change any byte; chunks are
// multiples of 8 elements so a packed mask byte is never split between chunks. Inner loops are
// templated on the dtype (elem.h) so they vectorise.
#include "mask.h"

#include "dtype.h"
#include "elem.h"

namespace fastmerge {
namespace {

constexpr int64_t kChunk = 1 << 14;  // elements per OpenMP work item (a multiple of 8)

inline bool bit(const uint8_t* packed, int64_t i) { return (packed[i >> 3] >> (i & 7)) & 1u; }

}  // namespace

void apply_mask(uintptr_t x, int dtype, uintptr_t mask, bool packed, float scale, uintptr_t out, int64_t n) {
  check_output_dtype(dtype);
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mask);
  const int64_t n_chunks = (n + kChunk - 1) / kChunk;
  dispatch_float_dtype(dtype, [&](auto tag) {
    using E = Elem<decltype(tag)::value>;
    const typename E::T* src = reinterpret_cast<const typename E::T*>(x);
    typename E::T* dst = reinterpret_cast<typename E::T*>(out);
    const typename E::T zero = E::put(0.0f);
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < n_chunks; ++c) {
      const int64_t end = c * kChunk + kChunk < n ? c * kChunk + kChunk : n;
      if (packed) {
#pragma omp simd
        for (int64_t i = c * kChunk; i < end; ++i) dst[i] = bit(m, i) ? E::put(E::get(src[i]) * scale) : zero;
      } else {
#pragma omp simd
        for (int64_t i = c * kChunk; i < end; ++i) dst[i] = m[i] ? E::put(E::get(src[i]) * scale) : zero;
      }
    }
  });
}

void pack_mask(uintptr_t dense, int64_t n, uintptr_t packed) {
  const uint8_t* d = reinterpret_cast<const uint8_t*>(dense);
  uint8_t* p = reinterpret_cast<uint8_t*>(packed);
  const int64_t n_bytes = (n + 7) / 8;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < n_bytes; ++b) {
    uint8_t byte = 0;
    const int64_t first = b * 8;
    const int k = n - first < 8 ? int(n - first) : 8;
    for (int j = 0; j < k; ++j) byte |= uint8_t((d[first + j] != 0) << j);
    p[b] = byte;
  }
}

void unpack_mask(uintptr_t packed, int64_t n, uintptr_t dense) {
  const uint8_t* p = reinterpret_cast<const uint8_t*>(packed);
  uint8_t* d = reinterpret_cast<uint8_t*>(dense);
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) d[i] = bit(p, i);
}

}  // namespace fastmerge

// Compile-time element access for the vectorised kernel loops.
//
// dtype.h's load()/store() switch on the dtype code per element, which stops the compiler from
// vectorising. Kernels instead pick an Elem<D> once per chunk (dispatch_float_dtype) and run a
// loop the compiler turns into AVX2/AVX-512 code; fp8 (rare, read-only) keeps the generic path.
#pragma once
#include <cstdint>
#include <type_traits>
#include "dtype.h"

namespace fastmerge {

template <int D> struct Elem;
template <> struct Elem<F32> {
  using T = float;
  static float get(T v) { return v; }
  static T put(float x) { return x; }
};
template <> struct Elem<F16> {
  using T = uint16_t;
  static float get(T v) { return f16_to_f32(v); }
  static T put(float x) { return f32_to_f16(x); }
};
template <> struct Elem<BF16> {
  using T = uint16_t;
  static float get(T v) { return bf16_to_f32(v); }
  static T put(float x) { return f32_to_bf16(x); }
};

// Calls f(std::integral_constant<int, D>{}) for the fp32/fp16/bf16 codes and returns true;
// returns false (without calling f) for any other code, so callers can fall back to load().
template <class F> bool dispatch_float_dtype(int dtype, F&& f) {
  switch (dtype) {
    case F32: f(std::integral_constant<int, F32>{}); return true;
    case F16: f(std::integral_constant<int, F16>{}); return true;
    case BF16: f(std::integral_constant<int, BF16>{}); return true;
  }
  return false;
}

// dst[j] = f(value of src[off + j] as fp32, j), for j < len: one vectorised loop per float
// dtype, the generic load() for fp8. The loaders below are its two uses.
template <class F>
inline void load_chunk_as(float* __restrict dst, const void* src, int dtype, int64_t off, int64_t len, F f) {
  bool fast = dispatch_float_dtype(dtype, [&](auto tag) {
    using E = Elem<decltype(tag)::value>;
    const typename E::T* __restrict s = static_cast<const typename E::T*>(src) + off;
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) dst[j] = f(E::get(s[j]), j);
  });
  if (!fast)
    for (int64_t j = 0; j < len; ++j) dst[j] = f(load(src, dtype, off + j), j);
}

// dst[j] = value of src[off + j] as fp32, for j < len.
inline void load_chunk(float* __restrict dst, const void* src, int dtype, int64_t off, int64_t len) {
  load_chunk_as(dst, src, dtype, off, len, [](float v, int64_t) { return v; });
}

// dst[j] = value of src[off + j] as fp32 minus sub[j], for j < len: load_chunk and the
// subtraction in one loop (the same fp32 values), so a task-vector chunk is written once.
inline void load_chunk_minus(float* __restrict dst, const void* src, int dtype, int64_t off, int64_t len,
                             const float* __restrict sub) {
  load_chunk_as(dst, src, dtype, off, len, [sub](float v, int64_t j) { return v - sub[j]; });
}

// d[j] = x[off + j] - b[off + j] in fp32 for j < len (b absent: d = x); the one definition of a
// task-vector element every kernel uses. `scratch` holds len floats.
inline void load_delta(float* __restrict d, float* __restrict scratch, const void* x, int x_dtype, const void* b,
                       int b_dtype, int64_t off, int64_t len) {
  if (!b) return load_chunk(d, x, x_dtype, off, len);
  load_chunk(scratch, b, b_dtype, off, len);
  load_chunk_minus(d, x, x_dtype, off, len, scratch);
}

}  // namespace fastmerge

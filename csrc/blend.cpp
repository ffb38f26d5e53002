// Native weighted blend. The contract (DESIGN.md "Arithmetic") is element-wise: fp32 accumulator
// from 0, inputs in the given order, one std::fma per input, one rounding into the output dtype.
// Because nothing mixes elements, splitting the range into chunks across OpenMP threads cannot
// change a single bit, whatever the thread count.
//
// Speed: the work is memory-bound, so each chunk keeps its fp32 accumulator (and the base, when
// given) in L1 while streaming the inputs once each; the per-input and output loops are templated
// on the dtype (elem.h) so they vectorise to FMA/convert instructions. Because the dtype is
// resolved per input and per chunk, mixed input dtypes run at the same speed as uniform ones;
// only fp8 inputs take the scalar load() path.
#include "blend.h"

#include <cmath>
#include <stdexcept>

#include "dtype.h"
#include "elem.h"

namespace fastmerge {
namespace {

constexpr int64_t kChunk = 2048;  // 8 KiB of fp32 accumulator: stays in L1 with the base chunk.

// acc[j] = fma(w, x[off + j] (- b[j] when b), acc[j])
void accumulate(float* __restrict acc, const void* x, int dtype, float w, const float* __restrict b,
                int64_t off, int64_t len) {
  bool fast = dispatch_float_dtype(dtype, [&](auto tag) {
    using E = Elem<decltype(tag)::value>;
    const typename E::T* __restrict s = static_cast<const typename E::T*>(x) + off;
    if (b) {
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) acc[j] = std::fma(w, E::get(s[j]) - b[j], acc[j]);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) acc[j] = std::fma(w, E::get(s[j]), acc[j]);
    }
  });
  if (!fast) {
    for (int64_t j = 0; j < len; ++j) {
      float v = load(x, dtype, off + j);
      acc[j] = std::fma(w, b ? v - b[j] : v, acc[j]);
    }
  }
}

// out[off + j] = round(acc[j] * lam) without base (no multiply when lam == 1),
// round(fma(lam, acc[j], b[j])) with base.
void finish(void* out, int dtype, const float* __restrict acc, const float* __restrict b, float lam,
            int64_t off, int64_t len) {
  dispatch_float_dtype(dtype, [&](auto tag) {
    using E = Elem<decltype(tag)::value>;
    typename E::T* __restrict o = static_cast<typename E::T*>(out) + off;
    if (b) {
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) o[j] = E::put(std::fma(lam, acc[j], b[j]));
    } else if (lam != 1.0f) {
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) o[j] = E::put(acc[j] * lam);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) o[j] = E::put(acc[j]);
    }
  });
}

}  // namespace

void blend(const std::vector<uintptr_t>& inputs, const std::vector<int>& input_dtypes,
           const std::vector<float>& weights, uintptr_t base, int base_dtype, float lam,
           uintptr_t out, int out_dtype, int64_t n) {
  if (inputs.size() != input_dtypes.size() || inputs.size() != weights.size())
    throw std::invalid_argument("blend: inputs, input_dtypes and weights must have the same length");
  for (int d : input_dtypes) check_input_dtype(d);
  if (base) check_input_dtype(base_dtype);
  check_output_dtype(out_dtype);
  if (n <= 0) return;

  const int64_t n_chunks = (n + kChunk - 1) / kChunk;
  const size_t k = inputs.size();
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < n_chunks; ++c) {
    alignas(64) float acc[kChunk];
    alignas(64) float b[kChunk];
    const int64_t off = c * kChunk;
    const int64_t len = n - off < kChunk ? n - off : kChunk;
    const float* bp = nullptr;
    if (base) {
      load_chunk(b, reinterpret_cast<const void*>(base), base_dtype, off, len);
      bp = b;
    }
    for (int64_t j = 0; j < len; ++j) acc[j] = 0.0f;
    for (size_t i = 0; i < k; ++i)
      accumulate(acc, reinterpret_cast<const void*>(inputs[i]), input_dtypes[i], weights[i], bp, off, len);
    finish(reinterpret_cast<void*>(out), out_dtype, acc, bp, lam, off, len);
  }
}

}  // namespace fastmerge

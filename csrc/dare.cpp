// DARE support: the Philox draws and the whole-tensor L1 sums behind "rescale".
//
// The rescale factor ||d||_1 / ||kept||_1 is a ratio of fp64 sums over a whole tensor. fp64
// addition is not associative, so the order is fixed for every backend: lane l (of kL1Lanes)
// sums elements l, l + L, l + 2L, ... in index order; the lane sums are then added in lane order.
// Lanes make the order independent of threads here, map onto vectorised loops in Triton and
// numpy, and keep the final sequential sum short.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "selection.h"

namespace fastmerge {

std::pair<double, double> kept_l1(uintptr_t x, int x_dtype, uintptr_t b, int b_dtype, int64_t n,
                                  const Selector& selector, uintptr_t keep_out) {
  check_input_dtype(x_dtype);
  if (b) check_input_dtype(b_dtype);
  const void* xp = reinterpret_cast<const void*>(x);
  const void* bp = reinterpret_cast<const void*>(b);
  uint8_t* keep = reinterpret_cast<uint8_t*>(keep_out);
  std::vector<double> all(kL1Lanes, 0.0), kept(kL1Lanes, 0.0);
  const int64_t lane_blocks = kL1Lanes / kChunk;
  // A thread owns whole blocks of kChunk lanes and walks their rows in order, so each lane's
  // sum is sequential whatever the thread count.
#pragma omp parallel
  {
    std::vector<float> d(kChunk), scratch(kChunk);
#pragma omp for schedule(static)
    for (int64_t block = 0; block < lane_blocks; ++block) {
      double* all_acc = all.data() + block * kChunk;
      double* kept_acc = kept.data() + block * kChunk;
      for (int64_t off = block * kChunk; off < n; off += kL1Lanes) {
        const int64_t len = std::min(kChunk, n - off);
        load_delta(d.data(), scratch.data(), xp, x_dtype, bp, b_dtype, off, len);
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) {
          scratch[j] = d[j];
          all_acc[j] += std::fabs(double(d[j]));
        }
        selector.apply(scratch.data(), off, len, 1.f);
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) kept_acc[j] += std::fabs(double(scratch[j]));
        if (keep) {
          // A kept zero and a dropped element both contribute 0 to every later step, so
          // "value survived as nonzero" is a faithful keep mask (NaN != 0 counts as kept).
#pragma omp simd
          for (int64_t j = 0; j < len; ++j) keep[off + j] = scratch[j] != 0.f;
        }
      }
    }
  }
  double total_all = 0.0, total_kept = 0.0;
  for (int64_t lane = 0; lane < kL1Lanes; ++lane) {
    total_all += all[lane];
    total_kept += kept[lane];
  }
  return {total_all, total_kept};
}

void philox_fill(uintptr_t out, uint64_t key, int64_t offset, int64_t n) {
  float* o = reinterpret_cast<float*>(out);
  const int64_t blocks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < blocks; ++c)
    philox_uniform_block(key, uint64_t(offset + c * kChunk), std::min(kChunk, n - c * kChunk), o + c * kChunk);
}

}  // namespace fastmerge

// DARE support: the Philox draws and the whole-tensor L1 sums behind "rescale".
//
// The rescale factor ||d||_1 / ||kept||_1 is a ratio of fp64 sums over a whole tensor. fp64
// addition is not associative, so the order is fixed for every backend: lane l (of kL1Lanes)
// sums elements l, l + L, l + 2L, ... in index order; the lane sums are then added in lane order.
// Lanes make the order independent of threads here, map onto vectorised loops in Triton and
// numpy, and keep the final sequential sum short.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "mask.h"
#include "selection.h"
#include "threads.h"

namespace fastmerge {

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
// lanes[j] += |value j| in fp64 for the 16 floats of v, j < 16 where `live` says: the same
// additions, in the same order per lane, as kept_l1's scalar loop.
static void add_abs_f64(double* __restrict lanes, __m512 v, __mmask16 live) {
  const __m512d lo = _mm512_abs_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(v)));
  const __m512d hi = _mm512_abs_pd(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
  const __mmask8 live_lo = __mmask8(live), live_hi = __mmask8(live >> 8);
  _mm512_mask_storeu_pd(lanes, live_lo, _mm512_add_pd(_mm512_maskz_loadu_pd(live_lo, lanes), lo));
  _mm512_mask_storeu_pd(lanes + 8, live_hi, _mm512_add_pd(_mm512_maskz_loadu_pd(live_hi, lanes + 8), hi));
}

// kept_l1's row step for DARE's random selector, for j < len <= kChunk: all_acc[j] += |d[j]|,
// kept_acc[j] += |d[j]| where DARE keeps element off + j (philox_uniform(key, off + j) <
// density), and bit j of keep = kept and nonzero (keep may be null), drawing only where d[j] != 0.
// A zero contributes 0 to both L1 sums and its mask bit is 0 whether it is kept or not, so its
// draw cannot change what kept_l1 returns, and the generator is counter-based, so skipping it
// leaves every other draw as it was. The nonzero positions are compressed into idx, drawn, and
// the draws expanded back, with the sums and the mask made on the way, so d is read from
// registers and nothing else is written (one loop each instead of four; the same values).
// Compress and expand go through registers (idx is stored 16 whole lanes at a time, hence its
// 16 spare slots): AMD Zen 4 microcodes the memory forms (vpcompressd to memory, vexpandps from
// memory), which made the bookkeeping around the draws cost more than the draws.
// NaN != 0, so a NaN is drawn for (kept, it makes the sum NaN; dropped, it adds 0).
static void random_l1_step(const float* __restrict d, int64_t off, int64_t len, uint64_t key, float density,
                           double* __restrict all_acc, double* __restrict kept_acc, uint8_t* __restrict keep) {
  alignas(64) uint32_t idx[kChunk + 16];
  alignas(64) float u[kChunk];
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __mmask16 nonzero[kChunk / 16];  // per 16 elements, found once for both passes
  auto live_lanes = [len](int64_t j) { return __mmask16(len - j >= 16 ? 0xffffu : (1u << (len - j)) - 1u); };
  int64_t m = 0;
  for (int64_t j = 0; j < len; j += 16) {
    const __m512 v = _mm512_maskz_loadu_ps(live_lanes(j), d + j);
    const __mmask16 here = _mm512_mask_cmp_ps_mask(live_lanes(j), v, _mm512_setzero_ps(), _CMP_NEQ_UQ);
    _mm512_storeu_si512(idx + m, _mm512_maskz_compress_epi32(here, _mm512_add_epi32(_mm512_set1_epi32(int(j)), iota)));
    m += __builtin_popcount(here);
    nonzero[j / 16] = here;
    add_abs_f64(all_acc + j, v, live_lanes(j));
  }
  philox_uniform_at(key, uint64_t(off), idx, m, u);
  const __m512 threshold = _mm512_set1_ps(density);
  m = 0;
  for (int64_t j = 0; j < len; j += 16) {
    const __mmask16 here = nonzero[j / 16];
    const int count = __builtin_popcount(here);
    const __m512 draws = _mm512_maskz_expand_ps(here, _mm512_maskz_loadu_ps(__mmask16((1u << count) - 1u), u + m));
    m += count;
    const __mmask16 kept = _mm512_mask_cmp_ps_mask(here, draws, threshold, _CMP_LT_OQ);
    add_abs_f64(kept_acc + j, _mm512_maskz_loadu_ps(kept, d + j), live_lanes(j));
    if (keep) {
      const uint16_t bits = kept;  // dead lanes are 0; their byte exists only where a live lane is in it
      std::memcpy(keep + j / 8, &bits, len - j > 8 ? 2 : 1);
    }
  }
}
#define FASTMERGE_RANDOM_L1_STEP 1
#elif defined(__AVX2__)
// Per 8-bit lane mask, 8 nibbles: compress's nibble k = the lane of the k-th set bit, expand's
// nibble l = how many set bits lie below lane l (where lane l's draw sits among the compressed
// ones). AVX2 has no vpcompressd / vexpandps; a table lookup and a lane permute do their work.
struct LanePermutes {
  uint32_t compress[256] = {}, expand[256] = {};
  constexpr LanePermutes() {
    for (uint32_t mask = 0; mask < 256; ++mask)
      for (uint32_t lane = 0, below = 0; lane < 8; ++lane)
        if (mask >> lane & 1) {
          compress[mask] |= lane << (4 * below);
          expand[mask] |= below << (4 * lane);
          ++below;
        }
  }
};
constexpr LanePermutes kLanePermutes;

// The 8 nibbles of `nibbles` as 8 int32 lanes.
static __m256i unpack_nibbles(uint32_t nibbles) {
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(int(nibbles)), shifts), _mm256_set1_epi32(15));
}

// lanes[j] += |value j| in fp64 for the 8 floats of v: kept_l1's scalar additions, in its order.
static void add_abs_f64(double* __restrict lanes, __m256 v) {
  const __m256d sign = _mm256_set1_pd(-0.0);
  const __m256d lo = _mm256_andnot_pd(sign, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
  const __m256d hi = _mm256_andnot_pd(sign, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  _mm256_storeu_pd(lanes, _mm256_add_pd(_mm256_loadu_pd(lanes), lo));
  _mm256_storeu_pd(lanes + 4, _mm256_add_pd(_mm256_loadu_pd(lanes + 4), hi));
}

// The AVX-512 random_l1_step above, 8 lanes at a time: the same draws, sums and mask bits. Lanes
// past len load as 0, and adding +0 leaves a lane's sum as it was (its sums start at +0), so
// whole groups of 8 are added (all_acc and kept_acc have kChunk lanes, a multiple of 8).
static void random_l1_step(const float* __restrict d, int64_t off, int64_t len, uint64_t key, float density,
                           double* __restrict all_acc, double* __restrict kept_acc, uint8_t* __restrict keep) {
  alignas(32) uint32_t idx[kChunk + 8];
  alignas(32) float u[kChunk + 8];
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  uint8_t nonzero[kChunk / 8];
  auto load = [&](int64_t j) {
    return _mm256_maskload_ps(d + j, _mm256_cmpgt_epi32(_mm256_set1_epi32(int(len - j)), iota));
  };
  auto nonzero_lanes = [](__m256 v) { return _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_NEQ_UQ); };
  int64_t m = 0;
  for (int64_t j = 0; j < len; j += 8) {
    const __m256 v = load(j);
    const int here = _mm256_movemask_ps(nonzero_lanes(v));
    const __m256i lanes = unpack_nibbles(kLanePermutes.compress[here]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + m), _mm256_add_epi32(lanes, _mm256_set1_epi32(int(j))));
    m += __builtin_popcount(here);
    nonzero[j / 8] = uint8_t(here);
    add_abs_f64(all_acc + j, v);
  }
  philox_uniform_at(key, uint64_t(off), idx, m, u);
  std::fill_n(u + m, 8, 0.f);  // read below by the last group's permute, never kept
  const __m256 threshold = _mm256_set1_ps(density);
  m = 0;
  for (int64_t j = 0; j < len; j += 8) {
    const __m256 v = load(j);
    const int here = nonzero[j / 8];
    const __m256 draws = _mm256_permutevar8x32_ps(_mm256_loadu_ps(u + m), unpack_nibbles(kLanePermutes.expand[here]));
    m += __builtin_popcount(here);
    const __m256 kept = _mm256_and_ps(nonzero_lanes(v), _mm256_cmp_ps(draws, threshold, _CMP_LT_OQ));
    add_abs_f64(kept_acc + j, _mm256_and_ps(kept, v));
    if (keep) keep[j / 8] = uint8_t(_mm256_movemask_ps(kept));
  }
}
#define FASTMERGE_RANDOM_L1_STEP 1
#endif

// kept[j] = d[j] if the selector keeps element off + j, else 0 (as far as kept_l1 can tell: a
// kept zero may come out +0).
static void kept_values(const float* __restrict d, float* __restrict kept, int64_t off, int64_t len,
                        const Selector& selector) {
  std::copy(d, d + len, kept);
  selector.apply(kept, off, len, 1.f);
}

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
        uint8_t* keep_bits = keep ? keep + off / 8 : nullptr;  // off is a multiple of kChunk
#if defined(FASTMERGE_RANDOM_L1_STEP)
        if (selector.mode == RANDOM) {
          random_l1_step(d.data(), off, len, selector.key, selector.density, all_acc, kept_acc, keep_bits);
          continue;
        }
#endif
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) all_acc[j] += std::fabs(double(d[j]));
        kept_values(d.data(), scratch.data(), off, len, selector);
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) kept_acc[j] += std::fabs(double(scratch[j]));
        if (keep_bits) {
          // A kept zero and a dropped element both contribute 0 to every later step, so
          // "value survived as nonzero" is a faithful keep mask (NaN != 0 counts as kept).
          pack_run(scratch.data(), len, keep_bits);
        }
      }
    }
  }
  return lane_totals(all, kept);
}

std::pair<double, double> lane_totals(const std::vector<double>& all, const std::vector<double>& kept) {
  double total_all = 0.0, total_kept = 0.0;
  for (size_t lane = 0; lane < all.size(); ++lane) {
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

void philox_fill_at(uintptr_t out, uint64_t key, int64_t offset, uintptr_t idx, int64_t n) {
  float* o = reinterpret_cast<float*>(out);
  const uint32_t* at = reinterpret_cast<const uint32_t*>(idx);
  const int64_t blocks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < blocks; ++c)
    philox_uniform_at(key, uint64_t(offset), at + c * kChunk, std::min(kChunk, n - c * kChunk), o + c * kChunk);
}

}  // namespace fastmerge

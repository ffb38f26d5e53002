// Per-model sparsifier shared by the TIES-family kernel (selection.cpp) and the DARE / rescale
// kernels (dare.cpp): which elements of a task vector d = x - b survive trimming.
//
// Selection works on the fp32 bit pattern of |d| (non-negative IEEE floats order like their
// bits), so "keep the top k" is "bits > t, or bits == t and flat index < tie_cut", where t and
// tie_cut come from the histogram threshold (fastmerge/ops/threshold.py).
#pragma once
#include <cstdint>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <tuple>
#include <utility>
#include <vector>

#include "dtype.h"
#include "elem.h"
#include "philox.h"

namespace fastmerge {

enum SparsifyMode : int {
  KEEP_ALL = 0,   // density 1: nothing trimmed
  MAGNITUDE = 1,  // top-k by |d|: (t_hi, cut_hi)
  OUTLIERS = 2,   // breadcrumbs: in top-k_lo (t_lo, cut_lo) but not in top-k_hi (t_hi, cut_hi)
  RANDOM = 3,     // DARE: philox_uniform(key, index) < density
  MASKED = 4,     // a precomputed keep mask (uint8 per element, e.g. della_mask below)
  MASK_BITS = 5,  // a precomputed keep mask, 8 elements a byte: element e is bit e % 8 of byte e / 8
};

struct Selector {
  int mode = KEEP_ALL;
  uint32_t t_hi = 0;
  int64_t cut_hi = 0;
  uint32_t t_lo = 0;
  int64_t cut_lo = 0;
  uint64_t key = 0;
  float density = 1.f;
  const uint8_t* keep = nullptr;  // MASKED: nonzero = kept, by flat element; MASK_BITS: the bits

  // Bitwise, not short-circuit, operators: the loops below stay branch-free and vectorise.
  static bool in_top(uint32_t bits, int64_t i, uint32_t t, int64_t cut) {
    return (bits > t) | ((bits == t) & (i < cut));
  }
  // d[j] (element off + j) becomes d[j] * scale if kept, else 0. One loop per mode so the
  // compiler can vectorise each.
  void apply(float* __restrict d, int64_t off, int64_t len, float scale) const {
    switch (mode) {
      case MAGNITUDE:
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) {
          const uint32_t bits = f32_bits(d[j]) & 0x7fffffffu;
          d[j] = in_top(bits, off + j, t_hi, cut_hi) ? d[j] * scale : 0.f;
        }
        return;
      case OUTLIERS:
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) {
          const uint32_t bits = f32_bits(d[j]) & 0x7fffffffu;
          // `&`, not `&&`: both tests always run, so the loop has no branch to keep it scalar.
          const bool keep = int(in_top(bits, off + j, t_lo, cut_lo)) & int(!in_top(bits, off + j, t_hi, cut_hi));
          d[j] = keep ? d[j] * scale : 0.f;
        }
        return;
      case RANDOM: {
        // Draws a block at a time with the vector Philox, then one vectorised select.
        constexpr int64_t kDraws = 512;
        float u[kDraws];
        for (int64_t s = 0; s < len; s += kDraws) {
          const int64_t m = len - s < kDraws ? len - s : kDraws;
          philox_uniform_block(key, uint64_t(off + s), m, u);
          float* __restrict ds = d + s;
#pragma omp simd
          for (int64_t j = 0; j < m; ++j) ds[j] = u[j] < density ? ds[j] * scale : 0.f;
        }
        return;
      }
      case MASKED:
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) d[j] = keep[off + j] ? d[j] * scale : 0.f;
        return;
      case MASK_BITS: {
        int64_t j = 0;
#if !defined(__CUDACC__) && defined(__AVX512F__)
        // 16 elements from 16 bits when they start on a byte pair (the merge's chunks do).
        const __m512 s = _mm512_set1_ps(scale);
        if ((off & 15) == 0)
          for (; j + 16 <= len; j += 16) {
            uint16_t kept;
            std::memcpy(&kept, keep + ((off + j) >> 3), 2);
            _mm512_storeu_ps(d + j, _mm512_maskz_mul_ps(__mmask16(kept), _mm512_loadu_ps(d + j), s));
          }
#elif !defined(__CUDACC__) && defined(__AVX2__)
        // 8 elements from a byte: each lane tests its own bit, and the all-ones lanes keep the
        // product (a dropped lane becomes +0, as below).
        const __m256 s = _mm256_set1_ps(scale);
        const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        if ((off & 7) == 0)
          for (; j + 8 <= len; j += 8) {
            const __m256i byte = _mm256_set1_epi32(keep[(off + j) >> 3]);
            const __m256i kept = _mm256_cmpeq_epi32(_mm256_and_si256(byte, lane_bit), lane_bit);
            _mm256_storeu_ps(d + j, _mm256_and_ps(_mm256_castsi256_ps(kept), _mm256_mul_ps(_mm256_loadu_ps(d + j), s)));
          }
#endif
        for (; j < len; ++j) {
          const int64_t e = off + j;
          d[j] = (keep[e >> 3] >> (e & 7)) & 1 ? d[j] * scale : 0.f;
        }
        return;
      }
      default:
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) d[j] *= scale;
    }
  }
};

// Builds one Selector per model from parallel per-model parameter lists (the binding's layout).
inline std::vector<Selector> make_selectors(const std::vector<int>& modes, const std::vector<uint32_t>& t_hi,
                                            const std::vector<int64_t>& cut_hi, const std::vector<uint32_t>& t_lo,
                                            const std::vector<int64_t>& cut_lo, const std::vector<uint64_t>& keys,
                                            const std::vector<float>& densities,
                                            const std::vector<uintptr_t>& masks) {
  const size_t k = modes.size();
  if (t_hi.size() != k || cut_hi.size() != k || t_lo.size() != k || cut_lo.size() != k || keys.size() != k ||
      densities.size() != k || masks.size() != k)
    throw std::invalid_argument("per-model selector lists differ in length");
  std::vector<Selector> out(k);
  for (size_t i = 0; i < k; ++i) {
    if (modes[i] < KEEP_ALL || modes[i] > MASK_BITS) throw std::invalid_argument("unknown sparsify mode");
    if ((modes[i] == MASKED || modes[i] == MASK_BITS) && !masks[i])
      throw std::invalid_argument("mask selector without a mask");
    out[i] = Selector{modes[i], t_hi[i], cut_hi[i], t_lo[i], cut_lo[i], keys[i], densities[i],
                      reinterpret_cast<const uint8_t*>(masks[i])};
  }
  return out;
}

// Elements per chunk: the kernels load each input chunk to fp32 once (vectorised), then work
// on the fp32 copies. 512 keeps a TIES pass's working set in L1d (three models' deltas, base and
// four accumulators: 9 x 2 KiB), which 2048 did not (72 KiB against 48). kL1Lanes is a multiple.
constexpr int64_t kChunk = 512;

// bits[j] = fp32 bit pattern of |x - b| at element off + j, for j < len; returns how many are NaN
// (patterns above +inf's). d and scratch hold kChunk floats each.
inline int64_t load_abs_bits(uint32_t* __restrict bits, float* __restrict d, float* __restrict scratch, const void* x,
                             int x_dtype, const void* b, int b_dtype, int64_t off, int64_t len) {
  load_delta(d, scratch, x, x_dtype, b, b_dtype, off, len);
  int64_t nans = 0;
#pragma omp simd reduction(+ : nans)
  for (int64_t j = 0; j < len; ++j) {
    bits[j] = f32_bits(d[j]) & 0x7fffffffu;
    nans += bits[j] > 0x7f800000u;
  }
  return nans;
}

}  // namespace fastmerge

// ---- kernel entry points (bound in bindings.cpp; pointers are raw addresses, 0 = absent) ----
namespace fastmerge {

constexpr int kHistBins = 65536;
// Lane count of the fixed fp64 summation order for whole-tensor L1 norms (see dare.cpp).
constexpr int64_t kL1Lanes = 65536;

// Adds to hist (int64[65536]) the histogram of the fp32 bits of |x - b|: phase 1 bins the top 16
// bits; phase 2 bins the low 16 bits of the elements whose top 16 bits equal `bucket`.
// Returns how many elements are NaN (the caller raises).
int64_t magnitude_histogram(uintptr_t x, int x_dtype, uintptr_t b, int b_dtype, int64_t n, uintptr_t hist,
                            int phase, uint32_t bucket);

// The keep-exactly-k threshold of |x - b| for each k (1 <= k <= n) as (t_bits, ties_to_keep,
// tie_count, tie cut-off), plus the NaN count (non-zero: no thresholds are computed). Usually one
// pass, when a `sample`-element strided sample predicts where the threshold lies
// (topk_select.cpp); otherwise the two histogram passes and the tie scan. Same result either way.
std::pair<std::vector<std::tuple<uint32_t, int64_t, int64_t, int64_t>>, int64_t> select_top_k(
    uintptr_t x, int x_dtype, uintptr_t b, int b_dtype, int64_t n, const std::vector<int64_t>& ks, int64_t sample);

// Flat index of the (ties_to_keep + 1)-th element with bits(|x - b|) == t_bits in [begin, end),
// counting `seen` such elements before begin; `end` if it is not there. Vectorised counts per
// chunk, element by element only in the chunk that holds it.
int64_t find_tie(const void* x, int x_dtype, const void* b, int b_dtype, int64_t begin, int64_t end, uint32_t t_bits,
                 int64_t seen, int64_t ties_to_keep);

// Flat index of the (ties_to_keep + 1)-th element with bits(|x - b|) == t_bits, or n: the
// exclusive end of the ties that the keep-exactly-k rule keeps.
int64_t tie_cutoff(uintptr_t x, int x_dtype, uintptr_t b, int b_dtype, int64_t n, uint32_t t_bits,
                   int64_t ties_to_keep);

// DELLA's keep mask of d = x - b viewed as [outer, row_len, inner]: uint8[n], or with `bits`
// (unit-stride rows of a multiple of 8 elements) MASK_BITS' uint8[n / 8], an eighth of the pages
// to fault in and zero and of the bytes the merge reads. Each fibre along the middle axis
// (mergekit ranks along dim 1) ranks |d| ascending (ties by position), and element (o, r, i) is kept where philox_uniform(key, flat index) < fp32((density - epsilon) +
// (2 epsilon) * rank / (row_len - 1)), that expression in fp64. row_len >= 2. `ranking` picks
// how unit-stride rows are ranked (the mask is the same): RANK_AUTO, what is faster on this CPU;
// RANK_SCALAR; or RANK_VECTOR, 16 elements at a time where the build has AVX-512 CD/VPOPCNTDQ
// (scalar otherwise). Tests ask for each. With `l1` it also returns kept_l1's two sums for this
// mask where it can make them in kept_l1's lane order on the way (unit-stride rows whose length
// divides kL1Lanes), which saves the rescale pass; nullopt otherwise.
enum DellaRanking : int { RANK_AUTO = 0, RANK_SCALAR = 1, RANK_VECTOR = 2 };
std::optional<std::pair<double, double>> della_mask(uintptr_t x, int x_dtype, uintptr_t b, int b_dtype,
                                                    int64_t outer, int64_t row_len, int64_t inner, double density,
                                                    double epsilon, uint64_t key, uintptr_t mask, bool bits,
                                                    int ranking, bool l1);

// The fused TIES-family merge (fastmerge/ops/ties.py documents the arithmetic order).
void ties_merge(uintptr_t out, int out_dtype, uintptr_t b, int b_dtype, int64_t n, const std::vector<uintptr_t>& xs,
                const std::vector<int>& x_dtypes, const std::vector<float>& weights, const std::vector<float>& scales,
                const std::vector<Selector>& selectors, bool consensus, bool normalize, float lam);

// (sum |d|, sum over kept |d|) in fp64, in the fixed lane order of dare.cpp. With keep_out
// (uint8[ceil(n / 8)], 0 = none) it also writes the selection as MASK_BITS, so the merge can
// replay it without drawing the DARE randoms a second time (bits, not bytes: an eighth of the
// fresh pages to fault in and zero, which were a tenth of a dare_ties merge's CPU time). With
// AVX-512 it draws only where d != 0: a zero's draw cannot change the sums or the mask (dare.cpp).
std::pair<double, double> kept_l1(uintptr_t x, int x_dtype, uintptr_t b, int b_dtype, int64_t n,
                                  const Selector& selector, uintptr_t keep_out);

// (sum of all, sum of kept) of per-lane fp64 sums, lane 0 first: the last step of the L1 order.
std::pair<double, double> lane_totals(const std::vector<double>& all, const std::vector<double>& kept);

// philox_uniform(key, offset + i) for i < n into an fp32 buffer (tests compare the draws).
void philox_fill(uintptr_t out, uint64_t key, int64_t offset, int64_t n);

// out[k] = philox_uniform(key, offset + idx[k]) for k < n (idx: uint32[n], ascending): the
// draws at chosen elements, as DARE's L1 pass makes them for the nonzeros of a task vector.
void philox_fill_at(uintptr_t out, uint64_t key, int64_t offset, uintptr_t idx, int64_t n);

}  // namespace fastmerge

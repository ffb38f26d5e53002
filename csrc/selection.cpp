// Magnitude selection (histogram threshold, tie cut-off) and the fused TIES-family merge.
// Every loop works on kChunk-element fp32 copies of the inputs (selection.h load_delta).
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "bin_counter.h"
#include "mask.h"
#include "selection.h"
#include "threads.h"

namespace fastmerge {

namespace {
void check_inputs(int x_dtype, uintptr_t b, int b_dtype) {
  check_input_dtype(x_dtype);
  if (b) check_input_dtype(b_dtype);
}
int64_t chunk_count(int64_t n) { return (n + kChunk - 1) / kChunk; }
}  // namespace

namespace {
// Histogram of chunks [c0, c1) (phase 1: top 16 bits; phase 2: low 16 bits of the elements in
// `bucket`) through `count(len, bin_of, keep)`; returns the NaN count (a chunk with NaN is not
// counted: the caller raises, so the counts no longer matter).
template <class Count>
int64_t histogram_chunks(const void* xp, int x_dtype, const void* bp, int b_dtype, int64_t n, int64_t c0,
                         int64_t c1, int phase, uint32_t bucket, Count count) {
  std::vector<float> d(kChunk), scratch(kChunk);
  std::vector<uint32_t> bits(kChunk), low(kChunk);
  const uint32_t* b = bits.data();
  const uint32_t* l = low.data();
  const auto all = [](int64_t) { return true; };
  int64_t nan_count = 0;
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t off = c * kChunk, len = std::min(kChunk, n - off);
    const int64_t nans = load_abs_bits(bits.data(), d.data(), scratch.data(), xp, x_dtype, bp, b_dtype, off, len);
    nan_count += nans;
    if (nans) continue;
    if (phase == 1) {
      count(len, [b](int64_t j) { return b[j] >> 16; }, all);
      continue;
    }
    // Phase 2: compact the low halves of the bucket's elements first (written always, kept by
    // advancing m), so the counting loop has no data-dependent branch to mispredict.
    int64_t m = 0;
    for (int64_t j = 0; j < len; ++j) {
      low[m] = b[j] & 0xffffu;
      m += (b[j] >> 16) == bucket;
    }
    count(m, [l](int64_t j) { return l[j]; }, all);
  }
  return nan_count;
}

// Below this many elements one thread bins straight into the caller's histogram: starting the
// OpenMP team and merging 65536-bin private histograms cost more than the binning itself.
constexpr int64_t kSerialHistogram = int64_t(1) << 20;
}  // namespace

int64_t magnitude_histogram(uintptr_t x, int x_dtype, uintptr_t b, int b_dtype, int64_t n, uintptr_t hist,
                            int phase, uint32_t bucket) {
  check_inputs(x_dtype, b, b_dtype);
  if (phase != 1 && phase != 2) throw std::invalid_argument("histogram phase must be 1 or 2");
  const void* xp = reinterpret_cast<const void*>(x);
  const void* bp = reinterpret_cast<const void*>(b);
  int64_t* out = reinterpret_cast<int64_t*>(hist);
  const int64_t chunks = chunk_count(n);
  if (n < kSerialHistogram || omp_get_max_threads() == 1) {
    auto direct = [out](int64_t len, auto bin_of, auto keep) {
      for (int64_t j = 0; j < len; ++j)
        if (keep(j)) ++out[bin_of(j)];
    };
    return histogram_chunks(xp, x_dtype, bp, b_dtype, n, 0, chunks, phase, bucket, direct);
  }
  int64_t nan_count = 0;
  // A BinCounter per thread over contiguous chunk ranges, summed at the end: integer counts, so
  // the result does not depend on the thread count or schedule.
#pragma omp parallel reduction(+ : nan_count)
  {
    const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
    BinCounter local;
    auto counted = [&local](int64_t len, auto bin_of, auto keep) { local.add(len, bin_of, keep); };
    nan_count += histogram_chunks(xp, x_dtype, bp, b_dtype, n, chunks * t / threads, chunks * (t + 1) / threads,
                                  phase, bucket, counted);
#pragma omp critical
    local.drain_into(out);
  }
  return nan_count;
}

int64_t find_tie(const void* xp, int x_dtype, const void* bp, int b_dtype, int64_t begin, int64_t end,
                 uint32_t t_bits, int64_t seen, int64_t ties_to_keep) {
  std::vector<float> d(kChunk), scratch(kChunk);
  std::vector<uint32_t> bits(kChunk);
  for (int64_t off = begin; off < end; off += kChunk) {
    const int64_t len = std::min(kChunk, end - off);
    load_abs_bits(bits.data(), d.data(), scratch.data(), xp, x_dtype, bp, b_dtype, off, len);
    int64_t here = 0;
#pragma omp simd reduction(+ : here)
    for (int64_t j = 0; j < len; ++j) here += bits[j] == t_bits;
    if (seen + here > ties_to_keep)
      for (int64_t j = 0; j < len; ++j)
        if (bits[j] == t_bits && seen++ == ties_to_keep) return off + j;
    seen += here;
  }
  return end;
}

int64_t tie_cutoff(uintptr_t x, int x_dtype, uintptr_t b, int b_dtype, int64_t n, uint32_t t_bits,
                   int64_t ties_to_keep) {
  check_inputs(x_dtype, b, b_dtype);
  return find_tie(reinterpret_cast<const void*>(x), x_dtype, reinterpret_cast<const void*>(b), b_dtype, 0, n, t_bits,
                  0, ties_to_keep);
}

namespace {
// DELLA's keep decisions for one fibre: element r of rank q (its place in ascending order of
// keys, equal keys by position) is kept where draws[r] < probability[q].
//
// A rank only needs counting, not sorting: in a bf16 task vector most |d| are exact bf16 values
// (the low 16 bits of their fp32 pattern are zero: 99.5% in the 1.1B benchmark set), and among those the rank of r is
// (elements in lower top-16-bit bins) + (earlier elements in its own bin). So one pass counts the
// bins over the fibre's range of top halves, a prefix sum gives each bin's first rank, and a
// second pass in position order hands out ranks (and decides the keeps) with no scatter. Elements
// with low bits set are the largest of their bin: they are sorted (key, position) and take the
// bin's last ranks. A zero |d| (17% of one fine-tune's) gets bin 0 of its own, so zeros do not
// stretch the range down to the smallest exponent. A fibre whose range has many more bins than
// elements (tiny rows spanning many exponents) is sorted whole instead.
// A (key, position) pair, which sorts by key and then by position.
inline uint64_t key_and_position(const uint32_t* keys, int64_t r) { return (uint64_t(keys[r]) << 32) | uint64_t(r); }

class FibreRanker {
 public:
  FibreRanker(int64_t row_len, bool vector) : vector_(vector), sorted_(size_t(row_len)), bin_(size_t(row_len)) {}

  void decide(const uint32_t* __restrict keys, int64_t len, const float* __restrict draws,
              const float* __restrict probability, uint8_t* __restrict keep, int64_t stride) {
    uint32_t lo = UINT32_MAX, hi = 0;  // over the nonzero top halves
#pragma omp simd reduction(min : lo) reduction(max : hi)
    for (int64_t r = 0; r < len; ++r) {
      const uint32_t top = keys[r] >> 16;
      lo = std::min(lo, top ? top : UINT32_MAX);
      hi = std::max(hi, top);
    }
    const int64_t bins = hi ? int64_t(hi - lo) + 2 : 1;
    if (bins > kBinsPerElement * len + kSpareBins) return decide_sorted(keys, len, draws, probability, keep, stride);
    // bin = 0 for a zero top half, else top - lo + 1: in key order (a select, not a branch: a
    // zero is too common to predict).
    uint32_t* __restrict bin = bin_.data();
#pragma omp simd
    for (int64_t r = 0; r < len; ++r) {
      const uint32_t top = keys[r] >> 16;
      bin[r] = top ? top - lo + 1 : 0;
    }
    first_.assign(size_t(bins), 0);
    uint32_t* __restrict first = first_.data();
    uint64_t* __restrict sorted = sorted_.data();
    int64_t deferred = 0;
    int64_t r = vector_ ? count_bins(bin, len, first) : 0;
    for (; r < len; ++r) ++first[bin[r]];
    uint32_t rank = 0;
    for (int64_t b = 0; b < bins; ++b) rank += std::exchange(first[b], rank);
    r = vector_ && stride == 1 ? rank_exact(keys, bin, len, draws, probability, first, keep, sorted, deferred) : 0;
    for (; r < len; ++r) {
      if (keys[r] & 0xffffu)
        sorted[deferred++] = key_and_position(keys, r);
      else
        keep[r * stride] = draws[r] < probability[first[bin[r]]++];
    }
    std::sort(sorted, sorted + deferred);
    for (int64_t i = 0; i < deferred; ++i) {
      const int64_t r = int64_t(uint32_t(sorted[i]));
      keep[r * stride] = draws[r] < probability[first[bin[r]]++];
    }
  }

 private:
  // Counting pays while the bins it clears and sums are not many more than the elements.
  static constexpr int64_t kBinsPerElement = 4;
  static constexpr int64_t kSpareBins = 256;

#if defined(__AVX512CD__) && defined(__AVX512VPOPCNTDQ__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  // The counting and rank passes 16 elements at a time. A fibre's |d| take few distinct values
  // (small multiples of an ulp: about 110 in a 2048-element row of the 1.1B benchmark set), so
  // many of 16 neighbours share a bin: vpconflictd tells each lane how many earlier lanes share
  // its bin, one gather reads the counters, and one scatter writes them back. A scatter writes
  // overlapping lanes in lane order, so the highest lane of a bin, which carries its full count,
  // is what stays. With the rare low-bit keys picked out of the same 16 lanes, the masks take
  // 17-20% less time than the scalar passes on the Intel machines (one up_proj, 1 and 2 threads,
  // interleaved), but 15% more on AMD Zen 4 (see vector_ranking_pays).
  // Both return how many elements they handled; the caller's scalar loop does the rest.

  // What each of `lanes` takes from its bin's counter, in lane order (the counter plus the
  // earlier lanes of its bin); the counters move past every lane. Lanes outside `lanes` must
  // hold bins no lane inside shares.
  static __m512i take_in_lane_order(uint32_t* counters, __m512i b, __mmask16 lanes) {
    const __m512i taken = _mm512_add_epi32(_mm512_mask_i32gather_epi32(_mm512_setzero_si512(), lanes, b, counters, 4),
                                           _mm512_popcnt_epi32(_mm512_conflict_epi32(b)));
    _mm512_mask_i32scatter_epi32(counters, lanes, b, _mm512_add_epi32(taken, _mm512_set1_epi32(1)), 4);
    return taken;
  }

  // Counts bins[0, len) into count.
  static int64_t count_bins(const uint32_t* bin, int64_t len, uint32_t* count) {
    int64_t r = 0;
    for (; r + 16 <= len; r += 16) take_in_lane_order(count, _mm512_loadu_si512(bin + r), 0xffff);
    return r;
  }

  // The position-order rank pass for exact keys (low 16 bits zero) with unit stride: each such
  // element takes its bin's next rank and is kept where its draw is below that rank's
  // probability. Other lanes get distinct out-of-range bins, so they share no exact lane's bin,
  // and go to `deferred` as (key, position) pairs.
  static int64_t rank_exact(const uint32_t* keys, const uint32_t* bin, int64_t len, const float* draws,
                            const float* probability, uint32_t* next, uint8_t* keep, uint64_t* deferred,
                            int64_t& n_deferred) {
    const __m512i low_bits = _mm512_set1_epi32(0xffff);
    const __m512i unshared = _mm512_or_si512(_mm512_set1_epi32(int(0x80000000u)),
                                             _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    const __m128i ones = _mm_set1_epi8(1);
    int64_t r = 0;
    for (; r + 16 <= len; r += 16) {
      const __mmask16 exact = _mm512_testn_epi32_mask(_mm512_loadu_si512(keys + r), low_bits);
      const __m512i b = _mm512_mask_mov_epi32(unshared, exact, _mm512_loadu_si512(bin + r));
      const __m512i rank = take_in_lane_order(next, b, exact);
      const __m512 p = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), exact, rank, probability, 4);
      const __mmask16 kept = _mm512_mask_cmp_ps_mask(exact, _mm512_loadu_ps(draws + r), p, _CMP_LT_OQ);
      _mm_mask_storeu_epi8(keep + r, exact, _mm_maskz_mov_epi8(kept, ones));
      for (uint32_t others = uint16_t(~exact); others; others &= others - 1) {
        const int64_t at = r + __builtin_ctz(others);
        deferred[n_deferred++] = key_and_position(keys, at);
      }
    }
    return r;
  }
#else
  static int64_t count_bins(const uint32_t*, int64_t, uint32_t*) { return 0; }
  static int64_t rank_exact(const uint32_t*, const uint32_t*, int64_t, const float*, const float*, uint32_t*,
                            uint8_t*, uint64_t*, int64_t&) {
    return 0;
  }
#endif

  // Rank by sorting (key, position) pairs: what a wide-ranged fibre falls back on.
  void decide_sorted(const uint32_t* keys, int64_t len, const float* draws, const float* probability, uint8_t* keep,
                     int64_t stride) {
    for (int64_t r = 0; r < len; ++r) sorted_[r] = key_and_position(keys, r);
    std::sort(sorted_.begin(), sorted_.begin() + len);
    for (int64_t q = 0; q < len; ++q) {
      const int64_t r = int64_t(uint32_t(sorted_[q]));
      keep[r * stride] = draws[r] < probability[q];
    }
  }

  bool vector_;                   // the 16-lane passes where they apply, else the scalar loops
  std::vector<uint64_t> sorted_;  // (key, position) pairs
  std::vector<uint32_t> bin_;     // per element
  std::vector<uint32_t> first_;   // per bin: its count, then the next rank it hands out
};

// The 16-lane ranking leans on gathers and scatters of bin counters. Measured on one up_proj
// mask (11.5M elements, 1 thread, medians of 15, 4 interleaved pairs): 17-20% faster than the
// scalar passes on the Intel machines of earlier sessions, 15% slower on an AMD EPYC (Zen 4:
// 62-67 against 53-56 ms), whose scatters cost more.
bool vector_ranking_pays() {
#if defined(__x86_64__) || defined(__i386__)
  return !__builtin_cpu_is("amd");
#else
  return true;  // no 16-lane passes are built there anyway
#endif
}
}  // namespace

std::optional<std::pair<double, double>> della_mask(uintptr_t x, int x_dtype, uintptr_t b, int b_dtype,
                                                    int64_t outer, int64_t row_len, int64_t inner, double density,
                                                    double epsilon, uint64_t key, uintptr_t mask, bool bits,
                                                    int ranking, bool l1) {
  check_inputs(x_dtype, b, b_dtype);
  if (row_len < 2 || row_len > int64_t(0xffffffff))
    throw std::invalid_argument("della_mask needs rows of 2 to 2^32 - 1 elements");
  if (bits && (inner != 1 || row_len % 8 != 0))
    throw std::invalid_argument("della_mask writes bits only for unit-stride rows of a multiple of 8 elements");
  if (ranking < RANK_AUTO || ranking > RANK_VECTOR) throw std::invalid_argument("unknown della ranking");
  const bool vector = ranking == RANK_VECTOR || (ranking == RANK_AUTO && vector_ranking_pays());
  const void* xp = reinterpret_cast<const void*>(x);
  const void* bp = reinterpret_cast<const void*>(b);
  uint8_t* keep = reinterpret_cast<uint8_t*>(mask);
  const double low = density - epsilon, spread = 2.0 * epsilon, span = double(row_len - 1);
  // The rescale pass's L1 sums (kept_l1's lane order: lane l adds elements l, l + L, ... in index
  // order) come out of this pass when every fibre is a unit-stride row inside one row of kL1Lanes
  // lanes (row_len divides kL1Lanes): fibres f, f + C, f + 2C, ... (C = kL1Lanes / row_len) then
  // cover the same lanes in index order, so a thread that owns whole residue classes of fibres
  // makes each of its lanes' sums in that order, whatever the thread count. Otherwise (and with
  // fewer classes than threads, which would idle some) the caller runs kept_l1.
  const int64_t classes = kL1Lanes % row_len == 0 ? kL1Lanes / row_len : 0;
  const bool sums = l1 && inner == 1 && classes >= omp_get_max_threads();
  std::vector<double> all(sums ? kL1Lanes : 0, 0.0), kept(sums ? kL1Lanes : 0, 0.0);
#pragma omp parallel
  {
    std::vector<uint32_t> keys(row_len);
    std::vector<float> row(row_len), scratch(row_len), draws(row_len), probability(row_len);
    std::vector<uint8_t> row_keep(bits ? row_len : 0);  // a row's keep bytes before they are packed
    FibreRanker ranker(row_len, vector);
    // The keep probability of each rank is the same for every fibre.
    for (int64_t rank = 0; rank < row_len; ++rank) probability[rank] = float(low + (spread * double(rank)) / span);
    // Where fibre's keep bytes go: the mask (strided by `inner`), or with `bits` the row buffer.
    auto kept_bytes = [&](int64_t start) { return bits ? row_keep.data() : keep + start; };
    // Load a fibre's row_len elements (strided by `inner` when the tensor has 3+ dims), rank them
    // by |d| bits (equal magnitudes by position), and draw each element's keep from its flat index.
    // With `bits` the row's bytes are packed into the mask: rows are whole bytes of it, so no two
    // threads write one byte.
    auto decide = [&](int64_t fibre) {
      const int64_t start = (fibre / inner) * row_len * inner + fibre % inner;
      if (inner == 1) {
        load_delta(row.data(), scratch.data(), xp, x_dtype, bp, b_dtype, start, row_len);
        philox_uniform_block(key, uint64_t(start), row_len, draws.data());
      } else {
        for (int64_t r = 0; r < row_len; ++r) {
          load_delta(&row[r], &scratch[r], xp, x_dtype, bp, b_dtype, start + r * inner, 1);
          draws[r] = philox_uniform(key, uint64_t(start + r * inner));
        }
      }
      // Every NaN ranks above +inf and ties with the other NaNs, as in a stable torch sort.
#pragma omp simd
      for (int64_t r = 0; r < row_len; ++r) keys[r] = std::min(f32_bits(row[r]) & 0x7fffffffu, 0x7f800001u);
      ranker.decide(keys.data(), row_len, draws.data(), probability.data(), kept_bytes(start), bits ? 1 : inner);
      if (bits) pack_run(row_keep.data(), row_len, keep + start / 8);
      return start;
    };
    if (sums) {
      // Each thread takes a contiguous range of classes and walks the rows of lanes in order.
      const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
      const int64_t c0 = classes * t / threads, c1 = classes * (t + 1) / threads;
      for (int64_t first = 0; first < outer; first += classes)
        for (int64_t fibre = first + c0; fibre < std::min(first + c1, outer); ++fibre) {
          const int64_t start = decide(fibre);
          double* __restrict all_acc = all.data() + start % kL1Lanes;
          double* __restrict kept_acc = kept.data() + start % kL1Lanes;
          const uint8_t* __restrict k = kept_bytes(start);
          const float* __restrict d = row.data();
#pragma omp simd
          for (int64_t r = 0; r < row_len; ++r) {
            const double a = std::fabs(double(d[r]));
            all_acc[r] += a;
            kept_acc[r] += k[r] ? a : 0.0;
          }
        }
    } else {
#pragma omp for schedule(static)
      for (int64_t fibre = 0; fibre < outer * inner; ++fibre) decide(fibre);
    }
  }
  if (!sums) return std::nullopt;
  return lane_totals(all, kept);
}

void ties_merge(uintptr_t out, int out_dtype, uintptr_t b, int b_dtype, int64_t n, const std::vector<uintptr_t>& xs,
                const std::vector<int>& x_dtypes, const std::vector<float>& weights, const std::vector<float>& scales,
                const std::vector<Selector>& selectors, bool consensus, bool normalize, float lam) {
  const size_t k = xs.size();
  if (k == 0) throw std::invalid_argument("ties_merge needs at least one input model");
  if (x_dtypes.size() != k || weights.size() != k || scales.size() != k || selectors.size() != k)
    throw std::invalid_argument("ties_merge per-model lists differ in length");
  check_output_dtype(out_dtype);
  if (!b) throw std::invalid_argument("ties_merge needs a base tensor");
  check_input_dtype(b_dtype);
  for (int d : x_dtypes) check_input_dtype(d);
  void* op = reinterpret_cast<void*>(out);
  const void* bp = reinterpret_cast<const void*>(b);
  // Without consensus every model counts, so the divisor is the same for every element.
  // mergekit treats a plain weight sum below 1e-8 in magnitude as 1.
  float all_weights = 0.f;
  for (float w : weights) all_weights += w;
  if (std::fabs(all_weights) < 1e-8f) all_weights = 1.f;

#pragma omp parallel
  {
    std::vector<float> base(kChunk), elect(kChunk), mixed(kChunk), div(kChunk), result(kChunk);
    std::vector<float> delta(k * kChunk);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunk_count(n); ++c) {
      const int64_t off = c * kChunk, len = std::min(kChunk, n - off);
      load_chunk(base.data(), bp, b_dtype, off, len);
      std::fill(elect.begin(), elect.end(), 0.f);
      for (size_t m = 0; m < k; ++m) {
        float* d = delta.data() + m * kChunk;
        load_chunk_minus(d, reinterpret_cast<const void*>(xs[m]), x_dtypes[m], off, len, base.data());
        selectors[m].apply(d, off, len, scales[m]);
        const float w = weights[m];
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) elect[j] = std::fma(w, d[j], elect[j]);
      }
      if (consensus) {
        std::fill(mixed.begin(), mixed.end(), 0.f);
        std::fill(div.begin(), div.end(), 0.f);
        for (size_t m = 0; m < k; ++m) {
          const float* d = delta.data() + m * kChunk;
          const float w = weights[m];
          if (w == 0.f) continue;  // sign(W) = 0: never agrees
          const float w_sign = w > 0.f ? 1.f : -1.f;
          // Adding fma(w, 0, mixed) and div + 0 leaves both unchanged (neither is ever -0), so
          // the disagreeing lanes are zeroed instead of branched around: the loop vectorises.
#pragma omp simd
          for (int64_t j = 0; j < len; ++j) {
            // sign(w) * sign(d) == elected sign  <=>  d * sign(w) * elected sign > 0 (exact: +-1 factors).
            const bool agrees = d[j] * (elect[j] >= 0.f ? w_sign : -w_sign) > 0.f;
            mixed[j] = std::fma(w, agrees ? d[j] : 0.f, mixed[j]);
            div[j] += agrees ? w : 0.f;
          }
        }
      } else {
        std::copy(elect.begin(), elect.end(), mixed.begin());
        std::fill(div.begin(), div.end(), all_weights);
      }
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        const float m = normalize ? mixed[j] / (div[j] == 0.f ? 1.f : div[j]) : mixed[j];
        result[j] = std::fma(lam, m, base[j]);
      }
      dispatch_float_dtype(out_dtype, [&](auto tag) {
        using E = Elem<decltype(tag)::value>;
        typename E::T* __restrict o = static_cast<typename E::T*>(op) + off;
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) o[j] = E::put(result[j]);
      });
    }
  }
}

}  // namespace fastmerge

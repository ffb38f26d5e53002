// Keep-exactly-k selection of |x - b| in one read of the tensor (usually).
//
// The two-phase histogram (magnitude_histogram) reads the tensor twice, incrementing a counter
// for every element in the first pass, and the tie cut-off scan reads it a third time. Here a
// strided sample first predicts a window of coarse buckets (top 16 bits of the fp32 pattern) that
// holds the k-th largest, and which of them the sample actually saw near that rank (a bf16 task
// vector's magnitudes are a few multiples of an ulp, so a window can span many buckets of which
// only two or three are occupied; spread-out data occupies many, and the histograms go to those
// nearest the expected rank). One pass then counts, per thread: the elements above the
// window (a vectorised compare), and each element in the window once, into one histogram: by
// its full bit pattern in a bucket that has a histogram, by its bucket and whether its low 16
// bits are zero in one that has not (the buckets' totals follow from it, so an element is
// counted once, not twice). That pins the k-th largest exactly whenever it falls in an
// occupied bucket, or is the smallest value of a bucket without one (low 16 bits zero: nearly
// every |d| of a bf16 task vector, whose tail spreads over more buckets than get histograms,
// as breadcrumbs' top 1% does), and the per-thread
// counts of its value say which thread's range holds the tie cut-off, so only that range is
// scanned. When the k-th largest lies outside the window, the classic passes decide; when it
// lies among the nonzero low bits of a bucket without a histogram, one fine pass over that
// bucket does. The answer never depends on the sample: only the speed does.
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <numeric>
#include <tuple>
#include <vector>

#include "bin_counter.h"
#include "selection.h"
#include "threads.h"

namespace fastmerge {

namespace {

// A window spans at most this many coarse buckets (counted per bucket) ...
constexpr uint32_t kMaxWindowBuckets = 64;
// ... of which at most this many get a full 65536-bin histogram.
constexpr int kMaxOccupied = 4;
constexpr int64_t kFineBins = 65536;
// Below this many elements one thread does the pass (as magnitude_histogram).
constexpr int64_t kSerialSelect = int64_t(1) << 20;

using Result = std::tuple<uint32_t, int64_t, int64_t, int64_t>;  // t_bits, ties_to_keep, tie_count, cut-off

// (bin holding the k-th largest, count in higher bins) for 1 <= k <= the histogram's total,
// walking down from `highest` (no bin above it may be non-empty).
std::pair<int64_t, int64_t> bin_of_kth(const int64_t* hist, int64_t highest, int64_t k) {
  int64_t above = 0;
  for (int64_t bin = highest; bin > 0; --bin) {
    if (above + hist[bin] >= k) return {bin, above};
    above += hist[bin];
  }
  return {0, above};
}

// Coarse buckets [lo, hi] predicted to hold the k-th largest; slot[bucket - lo] is the index of
// its full histogram among the occupied buckets, or kMaxOccupied (no histogram of its own).
struct Window {
  uint32_t lo = 1, hi = 0;  // lo > hi: no usable window
  std::vector<int> slot;
  int occupied = 0;

  bool usable() const { return lo <= hi; }
  uint32_t span() const { return hi - lo; }
  uint32_t last_bits() const { return (hi << 16) | 0xffffu; }
};

// For each k, the window from a histogram of `sample` evenly strided elements: the sample rank of
// the true k-th largest is binomial, so +-5 standard deviations (plus a few ranks) around
// k * sample / n covers it. A sample of the whole tensor is exact. `team` threads take the sample.
std::vector<Window> predict_windows(const void* xp, int x_dtype, const void* bp, int b_dtype, int64_t n,
                                    const std::vector<int64_t>& ks, int64_t sample,
                                    [[maybe_unused]] int team) {  // unused without OpenMP
  const int64_t m = std::min(n, std::max<int64_t>(sample, 1));
  // Element s * n / m for s < m, as s * q + s * r / m (no overflow: s * r < m^2), stepped
  // without a division per element. Each sampled element is a cache miss (and, in a mapped
  // file, often the first touch of its page), so the threads split the sample. Taken by one
  // thread, it was a fifth of the selection's time on an 11.5M-element tensor (perf), while the
  // other thread waited.
  const int64_t q_step = n / m, r_step = n % m;
  std::vector<uint16_t> bucket(static_cast<size_t>(m));
#pragma omp parallel num_threads(team)
  {
    const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t s0 = m * t / threads, s1 = m * (t + 1) / threads;
    int64_t i = s0 * q_step + s0 * r_step / m, carry = s0 * r_step % m;
    for (int64_t s = s0; s < s1; ++s) {
      const float d = bp ? load(xp, x_dtype, i) - load(bp, b_dtype, i) : load(xp, x_dtype, i);  // as load_delta
      bucket[s] = uint16_t(std::min(f32_bits(d) & 0x7fffffffu, 0x7f800000u) >> 16);
      i += q_step;
      carry += r_step;
      if (carry >= m) {
        carry -= m;
        ++i;
      }
    }
  }
  std::vector<int64_t> hist(kHistBins, 0);
  for (const uint16_t b : bucket) ++hist[b];
  int64_t highest = kHistBins - 1;
  while (highest > 0 && !hist[highest]) --highest;
  std::vector<Window> windows(ks.size());
  for (size_t q = 0; q < ks.size(); ++q) {
    int64_t top = ks[q], bottom = ks[q];
    if (m < n) {
      const double centre = double(ks[q]) * double(m) / double(n);
      const double margin = 5.0 * std::sqrt(centre * std::max(0.0, 1.0 - centre / double(m))) + 4.0;
      top = std::clamp<int64_t>(int64_t(std::floor(centre - margin)), 1, m);
      bottom = std::clamp<int64_t>(int64_t(std::ceil(centre + margin)), 1, m);
    }
    Window w;
    w.lo = uint32_t(bin_of_kth(hist.data(), highest, bottom).first);
    w.hi = uint32_t(bin_of_kth(hist.data(), highest, top).first);
    if (w.span() >= kMaxWindowBuckets) continue;
    // Histograms go to the occupied buckets most likely to hold the k-th largest (spread-out
    // data occupies more buckets than there are histograms): the sample rank of the k-th largest
    // is about normal around `centre`, so a bucket's chance is that normal's mass over the ranks
    // it covers in the sample.
    const double centre = double(ks[q]) * double(m) / double(n);
    const double scale = std::sqrt(2.0) * std::max(0.5, std::sqrt(centre * std::max(0.0, 1.0 - centre / double(m))));
    std::vector<std::pair<double, uint32_t>> by_chance;  // (chance, bucket)
    int64_t rank = bin_of_kth(hist.data(), highest, top).second;  // sample elements above w.hi
    for (uint32_t bucket = w.hi + 1; bucket-- > w.lo;) {
      if (!hist[bucket]) continue;
      const double first = double(rank) + 0.5, last = double(rank + hist[bucket]) + 0.5;
      by_chance.push_back({std::erf((last - centre) / scale) - std::erf((first - centre) / scale), bucket});
      rank += hist[bucket];
    }
    std::stable_sort(by_chance.begin(), by_chance.end(),
                     [](const auto& a, const auto& b) { return a.first > b.first; });
    w.slot.assign(w.span() + 1, kMaxOccupied);
    for (const auto& [chance, bucket] : by_chance)
      if (w.occupied < kMaxOccupied) w.slot[bucket - w.lo] = w.occupied++;
    windows[q] = std::move(w);
  }
  return windows;
}

// One thread's counts for one window.
struct WindowCounts {
  int64_t above = 0;
  std::vector<int64_t> buckets;  // per bucket of the window
  std::vector<int64_t> fine;     // per occupied slot, 65536 bins (low 16 bits)
  // Per bucket without a histogram, the elements whose low 16 bits are zero (the bucket's
  // smallest value, and in a bf16 task vector nearly all of them); the rest are above it.
  std::vector<int64_t> exact;
};

// Counts one chunk's bits into a window: the compare-and-count vectorises, and the elements in
// the window are compacted first so the counting loops run without a branch to mispredict.
class WindowCounter {
 public:
  explicit WindowCounter(const Window& w)
      : w_(w),
        unhistogrammed_(int64_t(w.occupied) * kFineBins),
        fine_(w.usable() ? unhistogrammed_ + 2 * (int64_t(w.span()) + 1) : 1),
        inside_(kChunk + 16) {}

  void add(const uint32_t* bits, int64_t len, WindowCounts& out) {
    const uint32_t lo = w_.lo << 16, span = w_.last_bits() - lo, last = w_.last_bits();
    int64_t m = 0;
    uint32_t* in = inside_.data();
    uint32_t above = 0;  // len <= kChunk: 32 bits hold the count, and the sum needs no widening
#pragma omp simd reduction(+ : above)
    for (int64_t j = 0; j < len; ++j) above += bits[j] > last;
    int64_t j = 0;
#if defined(__AVX512F__)
    // 16 at a time: compare, compress the hits to the front of a register, store it whole (the
    // buffer has 16 spare elements) and advance by the hit count.
    const __m512i lo_v = _mm512_set1_epi32(int(lo)), span_v = _mm512_set1_epi32(int(span));
    for (; j + 16 <= len; j += 16) {
      const __m512i v = _mm512_sub_epi32(_mm512_loadu_si512(bits + j), lo_v);
      const __mmask16 hit = _mm512_cmple_epu32_mask(v, span_v);
      _mm512_storeu_si512(in + m, _mm512_maskz_compress_epi32(hit, v));
      m += __builtin_popcount(hit);
    }
#endif
    for (; j < len; ++j) {
      in[m] = bits[j] - lo;
      m += bits[j] - lo <= span;
    }
    out.above += above;
    // One count per element: its bit pattern's bin if its bucket has a histogram, else one of
    // its bucket's two bins after the histograms, for low 16 bits zero or not (drain_into
    // recovers every bucket's total).
    const int* slot = w_.slot.data();
    const int64_t unhistogrammed = unhistogrammed_;
    fine_.add(m, [in, slot, unhistogrammed](int64_t j) {
      const uint32_t bucket = in[j] >> 16;
      const int s = slot[bucket];
      return s < kMaxOccupied ? int64_t(s) * kFineBins + (in[j] & 0xffffu)
                              : unhistogrammed + 2 * int64_t(bucket) + ((in[j] & 0xffffu) != 0);
    }, [](int64_t) { return true; });
  }

  void drain_into(WindowCounts& out) {
    std::vector<int64_t> bins(unhistogrammed_ + 2 * (int64_t(w_.span()) + 1), 0);
    fine_.drain_into(bins.data());
    out.buckets.assign(w_.span() + 1, 0);
    out.exact.assign(w_.span() + 1, 0);
    for (uint32_t i = 0; i <= w_.span(); ++i) {
      const int s = w_.slot[i];
      const bool histogrammed = s < kMaxOccupied;
      const int64_t* first = bins.data() + (histogrammed ? int64_t(s) * kFineBins : unhistogrammed_ + 2 * int64_t(i));
      out.buckets[i] = std::accumulate(first, first + (histogrammed ? kFineBins : 2), int64_t(0));
      if (!histogrammed) out.exact[i] = first[0];
    }
    bins.resize(unhistogrammed_);
    out.fine = std::move(bins);
  }

 private:
  const Window& w_;
  const int64_t unhistogrammed_;  // the first bin after the histograms: two per bucket without one
  BinCounter fine_;
  std::vector<uint32_t> inside_;
};

// The tie cut-off when no scan is needed: keep no tie (0) or all of them (n).
int64_t cut_without_scan(int64_t ties_to_keep, int64_t n) { return ties_to_keep <= 0 ? 0 : n; }

// The fine pass and the tie scan for a k-th largest known to lie in coarse bucket `bucket`,
// with `above` elements in higher buckets.
Result select_in_bucket(uintptr_t x, int x_dtype, uintptr_t b, int b_dtype, int64_t n, int64_t k, uint32_t bucket,
                        int64_t above) {
  std::vector<int64_t> fine(kHistBins, 0);
  magnitude_histogram(x, x_dtype, b, b_dtype, n, reinterpret_cast<uintptr_t>(fine.data()), 2, bucket);
  const auto [low, above_fine] = bin_of_kth(fine.data(), kHistBins - 1, k - above);
  const uint32_t t_bits = (bucket << 16) | uint32_t(low);
  const int64_t ties_to_keep = k - above - above_fine, tie_count = fine[low];
  int64_t cut = cut_without_scan(ties_to_keep, n);
  if (ties_to_keep > 0 && ties_to_keep < tie_count) cut = tie_cutoff(x, x_dtype, b, b_dtype, n, t_bits, ties_to_keep);
  return {t_bits, ties_to_keep, tie_count, cut};
}

// The classic selection: coarse pass, then select_in_bucket (what a mispredicted window falls back on).
Result two_pass_select(uintptr_t x, int x_dtype, uintptr_t b, int b_dtype, int64_t n, int64_t k) {
  std::vector<int64_t> coarse(kHistBins, 0);
  magnitude_histogram(x, x_dtype, b, b_dtype, n, reinterpret_cast<uintptr_t>(coarse.data()), 1, 0);
  const auto [bucket, above] = bin_of_kth(coarse.data(), kHistBins - 1, k);
  return select_in_bucket(x, x_dtype, b, b_dtype, n, k, uint32_t(bucket), above);
}

}  // namespace

std::pair<std::vector<Result>, int64_t> select_top_k(uintptr_t x, int x_dtype, uintptr_t b, int b_dtype, int64_t n,
                                                     const std::vector<int64_t>& ks, int64_t sample) {
  check_input_dtype(x_dtype);
  if (b) check_input_dtype(b_dtype);
  for (int64_t k : ks)
    if (k < 1 || k > n) throw std::invalid_argument("select_top_k needs 1 <= k <= n for every k");
  const void* xp = reinterpret_cast<const void*>(x);
  const void* bp = reinterpret_cast<const void*>(b);
  std::vector<Result> results;
  if (n == 0) return {results, 0};

  // The sample takes the same team as the pass: a tensor too small for two threads is cheap to sample.
  const int team = n < kSerialSelect ? 1 : omp_get_max_threads();
  const std::vector<Window> windows = predict_windows(xp, x_dtype, bp, b_dtype, n, ks, sample, team);
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  // counts[t][q]: thread t's counts for window q; first[t]: its first element.
  std::vector<std::vector<WindowCounts>> counts(team, std::vector<WindowCounts>(windows.size()));
  std::vector<int64_t> first(team + 1, n);
  int used = team;  // the team OpenMP actually gave (it may be smaller)
  int64_t nan_count = 0;
#pragma omp parallel num_threads(team) reduction(+ : nan_count)
  {
    const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
#pragma omp single
    used = int(threads);
    const int64_t c0 = chunks * t / threads, c1 = chunks * (t + 1) / threads;
    first[t] = std::min(n, c0 * kChunk);
    std::vector<WindowCounter> counters;
    counters.reserve(windows.size());
    for (const Window& w : windows) counters.emplace_back(w);
    std::vector<float> d(kChunk), scratch(kChunk);
    std::vector<uint32_t> bits(kChunk);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t off = c * kChunk, len = std::min(kChunk, n - off);
      const int64_t nans = load_abs_bits(bits.data(), d.data(), scratch.data(), xp, x_dtype, bp, b_dtype, off, len);
      nan_count += nans;
      if (nans) continue;
      for (size_t q = 0; q < windows.size(); ++q)
        if (windows[q].usable()) counters[q].add(bits.data(), len, counts[t][q]);
    }
    for (size_t q = 0; q < windows.size(); ++q)
      if (windows[q].usable()) counters[q].drain_into(counts[t][q]);
  }
  if (nan_count) return {results, nan_count};
  counts.resize(used);
  first[used] = n;

  for (size_t q = 0; q < ks.size(); ++q) {
    const int64_t k = ks[q];
    const Window& w = windows[q];
    // Find the bucket of the k-th largest from the exact counts above and in the window.
    int64_t above = 0;
    for (const auto& thread : counts) above += w.usable() ? thread[q].above : 0;
    int64_t bucket = -1;
    for (int64_t i = w.usable() && k > above ? int64_t(w.span()) : -1; i >= 0; --i) {
      int64_t here = 0;
      for (const auto& thread : counts) here += thread[q].buckets[i];
      if (above + here >= k) {
        bucket = i;
        break;
      }
      above += here;
    }
    if (bucket < 0) {  // mispredicted: outside the window
      results.push_back(two_pass_select(x, x_dtype, b, b_dtype, n, k));
      continue;
    }
    const int slot = w.slot[bucket];
    // Per thread, the count of the threshold's value (its ties), in flat order.
    std::vector<int64_t> ties_by_thread(used);
    uint32_t t_bits;
    int64_t ties_to_keep;
    if (slot < kMaxOccupied) {
      std::vector<int64_t> fine(kFineBins, 0);
      for (const auto& thread : counts)
        for (int64_t bin = 0; bin < kFineBins; ++bin) fine[bin] += thread[q].fine[slot * kFineBins + bin];
      const auto [low, above_fine] = bin_of_kth(fine.data(), kFineBins - 1, k - above);
      t_bits = ((w.lo + uint32_t(bucket)) << 16) | uint32_t(low);
      ties_to_keep = k - above - above_fine;
      for (int t = 0; t < used; ++t) ties_by_thread[t] = counts[t][q].fine[slot * kFineBins + low];
    } else {
      // A bucket without a histogram still pins the k-th largest when it is the bucket's
      // smallest value (low 16 bits zero): the elements with other low bits are all above it.
      int64_t exact = 0, here = 0;
      for (int t = 0; t < used; ++t) {
        exact += ties_by_thread[t] = counts[t][q].exact[bucket];
        here += counts[t][q].buckets[bucket];
      }
      const int64_t above_exact = here - exact;
      if (k - above <= above_exact) {  // among the other low bits: the bucket's histogram decides
        results.push_back(select_in_bucket(x, x_dtype, b, b_dtype, n, k, w.lo + uint32_t(bucket), above));
        continue;
      }
      t_bits = (w.lo + uint32_t(bucket)) << 16;
      ties_to_keep = k - above - above_exact;
    }
    int64_t tie_count = 0;
    for (int64_t here : ties_by_thread) tie_count += here;
    int64_t cut = cut_without_scan(ties_to_keep, n);
    if (ties_to_keep > 0 && ties_to_keep < tie_count) {
      // The thread ranges are in flat order: skip whole ranges by their tie counts.
      int64_t seen = 0;
      for (int t = 0; t < used; ++t) {
        if (seen + ties_by_thread[t] > ties_to_keep) {
          cut = find_tie(xp, x_dtype, bp, b_dtype, first[t], first[t + 1], t_bits, seen, ties_to_keep);
          break;
        }
        seen += ties_by_thread[t];
      }
    }
    results.push_back({t_bits, ties_to_keep, tie_count, cut});
  }
  return {results, 0};
}

}  // namespace fastmerge

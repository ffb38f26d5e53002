// Counting into many bins (65536 for a histogram of 16-bit keys) without one long dependency chain per bin.
//
// A bf16 task vector has few distinct magnitudes (|x - b| is a small multiple of one ulp), so a
// histogram of it increments the same few counters over and over; with one counter per bin every
// increment waits for the previous one (a store-to-load round trip, ~5 cycles). BinCounter keeps
// four interleaved uint32 copies of each bin (lane j % 4), so four increments are in flight, and
// adds them up into the caller's int64 histogram at the end. Counts are integers, so the result
// does not depend on which lane counted what.
#pragma once
#include <cstdint>
#include <vector>

namespace fastmerge {

class BinCounter {
 public:
  explicit BinCounter(int64_t bins = 65536) : bins_(bins), counts_(size_t(bins) * kLanes, 0) {}

  // Counts bin_of(j) (< bins) for every j < len where keep(j) holds.
  template <class Bin, class Keep>
  void add(int64_t len, Bin bin_of, Keep keep) {
    if (offered_ + len > kMaxOffered) spill();
    offered_ += len;
    uint32_t* __restrict c = counts_.data();
    int64_t j = 0;
    for (; j + kLanes <= len; j += kLanes)
      for (int lane = 0; lane < kLanes; ++lane)
        if (keep(j + lane)) ++c[size_t(bin_of(j + lane)) * kLanes + lane];
    for (; j < len; ++j)
      if (keep(j)) ++c[size_t(bin_of(j)) * kLanes];
  }

  // Adds everything counted to hist (int64[bins]).
  void drain_into(int64_t* hist) {
    collect([&](int64_t bin, int64_t total) { hist[bin] += total; });
    for (size_t bin = 0; bin < spilled_.size(); ++bin) hist[bin] += spilled_[bin];
    spilled_.clear();
    offered_ = 0;
  }

 private:
  static constexpr int kLanes = 4;
  // A uint32 lane cannot wrap before 2^32 elements have been offered.
  static constexpr int64_t kMaxOffered = int64_t(1) << 32;

  // Hands each hit bin's lane total to f and zeroes its lanes (most bins are never hit).
  template <class F>
  void collect(F f) {
    uint32_t* c = counts_.data();
    for (int64_t bin = 0; bin < bins_; ++bin) {
      uint32_t* lanes = c + size_t(bin) * kLanes;
      const int64_t total = int64_t(lanes[0]) + lanes[1] + lanes[2] + lanes[3];
      if (total) {
        f(bin, total);
        lanes[0] = lanes[1] = lanes[2] = lanes[3] = 0;
      }
    }
  }

  // Before the lanes could wrap: move their counts into int64 totals.
  void spill() {
    spilled_.resize(bins_, 0);
    collect([&](int64_t bin, int64_t total) { spilled_[bin] += total; });
    offered_ = 0;
  }

  int64_t bins_;
  std::vector<uint32_t> counts_;
  std::vector<int64_t> spilled_;
  int64_t offered_ = 0;
};

}  // namespace fastmerge

// Fused, blocked Gram matrix for the geometric methods (fastmerge/ops/dot.py).
//
// Why a kernel: torch needs the task vectors x_i - b as full fp32 tensors and then fp64 copies
// of them for the dot products, i.e. K extra tensor-sized buffers and several passes. Here each
// work item loads one block of every input (converted to fp32, base subtracted in fp32 exactly
// as the blend kernel does), and computes all K (K + 1) / 2 pair products while the block is in
// cache; the inputs are read once and nothing tensor-sized is allocated.
//
// Fixed summation order, whatever the thread count:
// - contiguous fibres (inner == 1): a fibre is cut into blocks of kBlock elements; inside a
//   block element d goes to lane d % kLanes, lanes are combined in a fixed tree, and the block
//   sums are added in block order after the parallel loop. (fp32 x fp32 products are exact in
//   fp64, so only the additions round, and their order is fixed by the code, not the compiler:
//   the build uses -ffp-contract=off.)
// - strided fibres (inner > 1, e.g. matrix columns): each fibre is summed sequentially in d;
//   the parallel loop runs over (outer, group of kColumns fibres) items, one fibre per thread.
#include "dot.h"

#include <algorithm>
#include <stdexcept>

#include "dtype.h"
#include "elem.h"

namespace fastmerge {
namespace {

constexpr int64_t kBlock = 4096;    // elements per block and input: 16 KiB of fp32 scratch
constexpr int kLanes = 8;           // independent fp64 partial sums per pair (two AVX2 registers)
constexpr int64_t kColumns = 512;   // strided fibres handled together by one work item

// load_delta on the binding's integer addresses: dst[j] = src[off + j] (- base[off + j]) in fp32.
void load_task(float* __restrict dst, uintptr_t src, int dtype, uintptr_t base, int base_dtype, int64_t off,
               int64_t len, float* __restrict base_scratch) {
  load_delta(dst, base_scratch, reinterpret_cast<const void*>(src), dtype, reinterpret_cast<const void*>(base),
             base_dtype, off, len);
}

// sum_d a[d] b[d] in fp64 with the lane order described above.
double block_dot(const float* __restrict a, const float* __restrict b, int64_t len) {
  double lane[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= len; d += kLanes)
    for (int l = 0; l < kLanes; ++l) lane[l] += double(a[d + l]) * double(b[d + l]);
  for (; d < len; ++d) lane[d % kLanes] += double(a[d]) * double(b[d]);
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

void check(const std::vector<uintptr_t>& inputs, const std::vector<int>& input_dtypes, uintptr_t base,
           int base_dtype) {
  if (inputs.size() != input_dtypes.size())
    throw std::invalid_argument("gram: inputs and input_dtypes must have the same length");
  if (inputs.empty()) throw std::invalid_argument("gram: needs at least one input");
  for (int d : input_dtypes) check_input_dtype(d);
  if (base) check_input_dtype(base_dtype);
}

void gram_contiguous(const std::vector<uintptr_t>& inputs, const std::vector<int>& dtypes, uintptr_t base,
                     int base_dtype, int64_t rows, int64_t length, double* out) {
  const int64_t k = int64_t(inputs.size()), pairs = k * (k + 1) / 2;
  const int64_t blocks = (length + kBlock - 1) / kBlock;
  std::vector<double> partial(size_t(rows * blocks * pairs));
#pragma omp parallel
  {
    std::vector<float> scratch(size_t((k + 1) * kBlock));
#pragma omp for schedule(static)
    for (int64_t item = 0; item < rows * blocks; ++item) {
      const int64_t row = item / blocks, blk = item % blocks;
      const int64_t off = row * length + blk * kBlock;
      const int64_t len = length - blk * kBlock < kBlock ? length - blk * kBlock : kBlock;
      for (int64_t i = 0; i < k; ++i)
        load_task(&scratch[i * kBlock], inputs[i], dtypes[i], base, base_dtype, off, len, &scratch[k * kBlock]);
      double* p = &partial[item * pairs];
      for (int64_t i = 0; i < k; ++i)
        for (int64_t j = i; j < k; ++j) *p++ = block_dot(&scratch[i * kBlock], &scratch[j * kBlock], len);
    }
  }
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < rows; ++row) {
    int64_t pair = 0;
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = i; j < k; ++j, ++pair) {
        double s = 0.0;
        for (int64_t blk = 0; blk < blocks; ++blk) s += partial[(row * blocks + blk) * pairs + pair];
        out[(i * k + j) * rows + row] = out[(j * k + i) * rows + row] = s;
      }
  }
}

void gram_strided(const std::vector<uintptr_t>& inputs, const std::vector<int>& dtypes, uintptr_t base,
                  int base_dtype, int64_t outer, int64_t length, int64_t inner, double* out) {
  const int64_t k = int64_t(inputs.size()), pairs = k * (k + 1) / 2, fibres = outer * inner;
  const int64_t groups = (inner + kColumns - 1) / kColumns;
#pragma omp parallel
  {
    std::vector<float> scratch(size_t((k + 1) * kColumns));
    std::vector<double> acc(size_t(pairs * kColumns));
#pragma omp for schedule(static)
    for (int64_t item = 0; item < outer * groups; ++item) {
      const int64_t o = item / groups, c0 = (item % groups) * kColumns;
      const int64_t width = inner - c0 < kColumns ? inner - c0 : kColumns;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t d = 0; d < length; ++d) {
        const int64_t off = (o * length + d) * inner + c0;
        for (int64_t i = 0; i < k; ++i)
          load_task(&scratch[i * kColumns], inputs[i], dtypes[i], base, base_dtype, off, width, &scratch[k * kColumns]);
        double* a = acc.data();
        for (int64_t i = 0; i < k; ++i)
          for (int64_t j = i; j < k; ++j, a += kColumns) {
            const float* x = &scratch[i * kColumns];
            const float* y = &scratch[j * kColumns];
#pragma omp simd
            for (int64_t c = 0; c < width; ++c) a[c] += double(x[c]) * double(y[c]);
          }
      }
      const double* a = acc.data();
      for (int64_t i = 0; i < k; ++i)
        for (int64_t j = i; j < k; ++j, a += kColumns)
          for (int64_t c = 0; c < width; ++c) {
            const int64_t r = o * inner + c0 + c;
            out[(i * k + j) * fibres + r] = out[(j * k + i) * fibres + r] = a[c];
          }
    }
  }
}

}  // namespace

void gram(const std::vector<uintptr_t>& inputs, const std::vector<int>& input_dtypes, uintptr_t base,
          int base_dtype, int64_t outer, int64_t length, int64_t inner, uintptr_t out) {
  check(inputs, input_dtypes, base, base_dtype);
  if (outer < 0 || length < 0 || inner < 0) throw std::invalid_argument("gram: negative extent");
  double* result = reinterpret_cast<double*>(out);
  if (inner == 1)
    gram_contiguous(inputs, input_dtypes, base, base_dtype, outer, length, result);
  else
    gram_strided(inputs, input_dtypes, base, base_dtype, outer, length, inner, result);
}

}  // namespace fastmerge

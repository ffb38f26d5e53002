// Blocked fp64 pairwise squared distances. OpenMP runs over (layer, block of X rows); each work
// item streams all of Y's rows against a few X rows held in cache, so Y is read n / kRows times
// instead of n. Every output element has one fixed summation order, so the result does not
// depend on the thread count (it may differ from a BLAS GEMM in the last bits, which is why
// rbf_similarity documents a tolerance rather than byte equality).
#include "rbf.h"

#include <cmath>
#include <vector>

namespace fastmerge {
namespace {

constexpr int64_t kRows = 8;

double dot(const double* __restrict a, const double* __restrict b, int64_t d) {
  double s = 0.0;
  for (int64_t k = 0; k < d; ++k) s = std::fma(a[k], b[k], s);
  return s;
}

}  // namespace

void rbf_sq_distances(uintptr_t x, uintptr_t y, int64_t layers, int64_t n, int64_t m, int64_t d, uintptr_t out) {
  const double* X = reinterpret_cast<const double*>(x);
  const double* Y = reinterpret_cast<const double*>(y);
  double* D = reinterpret_cast<double*>(out);
  if (layers <= 0 || n <= 0 || m <= 0) return;
  std::vector<double> ynorm(size_t(layers * m));
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < layers * m; ++r) ynorm[r] = dot(Y + r * d, Y + r * d, d);

  const int64_t blocks = (n + kRows - 1) / kRows;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t l = 0; l < layers; ++l) {
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t i0 = blk * kRows, i1 = i0 + kRows < n ? i0 + kRows : n;
      double xnorm[kRows];
      for (int64_t i = i0; i < i1; ++i) {
        const double* xi = X + (l * n + i) * d;
        xnorm[i - i0] = dot(xi, xi, d);
      }
      for (int64_t j = 0; j < m; ++j) {
        const double* yj = Y + (l * m + j) * d;
        for (int64_t i = i0; i < i1; ++i) {
          const double v = xnorm[i - i0] + ynorm[l * m + j] - 2.0 * dot(X + (l * n + i) * d, yj, d);
          D[(l * n + i) * m + j] = v < 0.0 ? 0.0 : v;  // NaN stays NaN, as in the reference's clamp_min
        }
      }
    }
  }
}

}  // namespace fastmerge

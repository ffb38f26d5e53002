"""Triton tiled kernel for the squared distances of fastmerge.ops.rbf_similarity.

Each program computes a BLOCK_N x BLOCK_M tile of D for one layer, looping over the feature
dimension in BLOCK_D slices. Accumulation is fp64 (the op's accuracy contract), which rules out
tl.dot (no fp64 tensor-core path), so the tile product is a broadcast multiply and sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common


@triton.jit
def _sq_distances_kernel(x_ptr, y_ptr, d_ptr, n, m, d, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    layer = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    x_base = x_ptr + layer * n * d
    y_base = y_ptr + layer * m * d
    dots = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float64)
    xx = tl.zeros([BLOCK_N], dtype=tl.float64)
    yy = tl.zeros([BLOCK_M], dtype=tl.float64)
    for k0 in range(0, d, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_base + rows[:, None] * d + ks[None, :], mask=(rows[:, None] < n) & (ks[None, :] < d), other=0.0)
        y = tl.load(y_base + cols[:, None] * d + ks[None, :], mask=(cols[:, None] < m) & (ks[None, :] < d), other=0.0)
        dots += tl.sum(x[:, None, :] * y[None, :, :], axis=2)
        xx += tl.sum(x * x, axis=1)
        yy += tl.sum(y * y, axis=1)
    dist = xx[:, None] + yy[None, :] - 2.0 * dots
    dist = tl.where(dist < 0.0, 0.0, dist)  # NaN stays NaN (tl.maximum may drop it), as in the reference
    out = d_ptr + layer * n * m + rows[:, None] * m + cols[None, :]
    tl.store(out, dist, mask=(rows[:, None] < n) & (cols[None, :] < m))


def sq_distances_triton(X: torch.Tensor, Y: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """Fill fp64 D [L, n, m] from contiguous fp64 X [L, n, d], Y [L, m, d]."""
    L, n, d = X.shape
    m = Y.shape[1]
    if D.numel() == 0:
        return D
    if d == 0:
        return D.zero_()
    block_n = min(16, triton.next_power_of_2(n))
    block_m = min(16, triton.next_power_of_2(m))
    block_d = min(64 if _common.sized_for_gpu(X.device) else 256, triton.next_power_of_2(d))
    grid = (L, triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _sq_distances_kernel[grid](X, Y, D, n, m, d, BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d,
                               **_common.LAUNCH_OPTIONS)
    return D

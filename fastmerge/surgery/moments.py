"""fp64 first and second moments of a token table's rows, a chunk of rows at a time.

The surgery methods that fit to the shared tokens' statistics (landmark_pca, stb, john_hewitt)
need a mean and a (cross-)covariance in fp64; converting a whole vocab x hidden table to fp64
would hold 8 bytes per weight (over 1 GB for a 32000 x 4096 embedding), so the rows are
converted and summed _CHUNK at a time.
"""

from __future__ import annotations

import torch

_CHUNK = 8192  # rows per fp64 accumulation step


def mean64(rows: torch.Tensor) -> torch.Tensor:
    """The rows' mean (D,) in fp64."""
    total = rows.new_zeros(rows.shape[1], dtype=torch.float64)
    for start in range(0, rows.shape[0], _CHUNK):
        total += rows[start:start + _CHUNK].double().sum(dim=0)
    return total / rows.shape[0]


def cross_gram(x: torch.Tensor, x_mean: torch.Tensor | None, y: torch.Tensor, y_mean: torch.Tensor | None) -> torch.Tensor:
    """(x - x_mean)^T (y - y_mean) in fp64 (no mean: rows used as they are)."""
    out = x.new_zeros((x.shape[1], y.shape[1]), dtype=torch.float64)
    for start in range(0, x.shape[0], _CHUNK):
        a = _centered64(x[start:start + _CHUNK], x_mean)
        b = a if y is x and y_mean is x_mean else _centered64(y[start:start + _CHUNK], y_mean)
        out += a.T @ b
    return out


def _centered64(rows: torch.Tensor, mean: torch.Tensor | None) -> torch.Tensor:
    rows = rows.double()
    return rows if mean is None else rows - mean

"""An exact fp32 fused multiply-add in plain torch: the oracle the kernels' std::fma / tl.fma
steps are compared with (DESIGN.md "Arithmetic")."""

from __future__ import annotations

import torch


def fma_f32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """fp32 fma(a, b, c), rounded once. The fp64 sum of the exact product and c is correctly
    rounded to fp32 except when it lands exactly on an fp32 rounding midpoint while the fp64 sum
    itself was inexact; then one fp64 step toward the exact value settles the tie correctly."""
    p = a.double() * b.double()  # exact: 24 + 24 bit significands
    c = c.double()
    s = p + c
    bv = s - p
    err = (p - (s - bv)) + (c - bv)  # TwoSum: s + err == p + c exactly
    nearest = s.float()
    # The other fp32 neighbour of s; s is a rounding midpoint iff it is their exact average.
    other = torch.nextafter(nearest, torch.where(s > nearest.double(), float("inf"), float("-inf")).float())
    midpoint = (nearest.double() + other.double() == 2 * s) & torch.isfinite(s)
    result = torch.where(midpoint & (err > 0), torch.maximum(nearest, other), nearest)
    return torch.where(midpoint & (err < 0), torch.minimum(nearest, other), result)

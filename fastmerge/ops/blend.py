"""Weighted N-way blend: out = sum_i w_i x_i (times lam), or b + lam * sum_i w_i (x_i - b).

The arithmetic contract (DESIGN.md): fp32 accumulation from 0 in config order, each step one
fused multiply-add, one round-to-nearest-even into the output dtype.
"""

from __future__ import annotations

from typing import Sequence

import torch


def blend_reference(
    inputs: Sequence[torch.Tensor],
    weights: Sequence[float],
    base: torch.Tensor | None = None,
    lam: float = 1.0,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Plain torch oracle. An fp32 fma is reproduced by one fp64 step rounded once to fp32."""
    out_dtype = out_dtype or inputs[0].dtype
    acc = torch.zeros(inputs[0].shape, dtype=torch.float32)
    b32 = base.to(torch.float32) if base is not None else None
    for w, x in zip(weights, inputs):
        term = x.to(torch.float32) if b32 is None else x.to(torch.float32) - b32
        w32 = torch.tensor(w, dtype=torch.float32).double()
        acc = (w32 * term.double() + acc.double()).float()
    if b32 is None:
        out = acc if lam == 1.0 else acc * torch.tensor(lam, dtype=torch.float32)
    else:
        lam32 = torch.tensor(lam, dtype=torch.float32).double()
        out = (lam32 * acc.double() + b32.double()).float()
    return out.to(out_dtype)


def blend(inputs, weights, base=None, lam=1.0, out_dtype=None, backend=None):
    """Dispatching entry point (only the reference backend until the kernels land)."""
    return blend_reference(inputs, weights, base=base, lam=lam, out_dtype=out_dtype)

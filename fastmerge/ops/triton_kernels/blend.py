"""Triton blend kernel (the contract of fastmerge.ops.blend, byte-identical to its reference).

A kernel cannot take a variable number of pointers, so inputs go in groups of up to
GROUP = 8 per launch. With more than 8 inputs the fp32 accumulator is carried between launches
in a scratch buffer; the per-element order of the fused multiply-adds is unchanged, so the bytes
are the same as a single pass.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ._common import LAUNCH_OPTIONS, elementwise_block, output_target, store_rounded

GROUP = 8


@triton.jit
def _step(acc, x_ptr, w, b, offs, mask, HAS_BASE: tl.constexpr):
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BASE:
        x = x - b
    return tl.fma(w, x, acc)


@triton.jit
def _blend_kernel(
    out_ptr, acc_ptr, base_ptr,
    x0, x1, x2, x3, x4, x5, x6, x7,
    w0, w1, w2, w3, w4, w5, w6, w7,
    lam, n,
    N_IN: tl.constexpr, HAS_BASE: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr,
    OUT_KIND: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if FIRST:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
    else:
        acc = tl.load(acc_ptr + offs, mask=mask, other=0.0)
    b = acc  # placeholder when there is no base; never read then
    if HAS_BASE:
        b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    acc = _step(acc, x0, w0, b, offs, mask, HAS_BASE)
    if N_IN > 1:
        acc = _step(acc, x1, w1, b, offs, mask, HAS_BASE)
    if N_IN > 2:
        acc = _step(acc, x2, w2, b, offs, mask, HAS_BASE)
    if N_IN > 3:
        acc = _step(acc, x3, w3, b, offs, mask, HAS_BASE)
    if N_IN > 4:
        acc = _step(acc, x4, w4, b, offs, mask, HAS_BASE)
    if N_IN > 5:
        acc = _step(acc, x5, w5, b, offs, mask, HAS_BASE)
    if N_IN > 6:
        acc = _step(acc, x6, w6, b, offs, mask, HAS_BASE)
    if N_IN > 7:
        acc = _step(acc, x7, w7, b, offs, mask, HAS_BASE)
    if LAST:
        if HAS_BASE:
            res = tl.fma(lam, acc, b)
        else:
            res = acc * lam  # multiplying by 1.0 is exact, so lam == 1 needs no special case
        store_rounded(out_ptr + offs, res, mask, OUT_KIND)
    else:
        tl.store(acc_ptr + offs, acc, mask=mask)


def blend_triton(
    inputs: Sequence[torch.Tensor],
    weights: Sequence[float],
    base: torch.Tensor | None,
    lam: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """Blend contiguous, same-shape `inputs` into the contiguous `out` (weights already fp32-exact)."""
    n = out.numel()
    if n == 0:
        return out
    target, out_kind = output_target(out)
    block = elementwise_block(n, out.device)
    grid = (triton.cdiv(n, block),)
    groups = [range(s, min(s + GROUP, len(inputs))) for s in range(0, len(inputs), GROUP)]
    scratch = torch.empty(n, dtype=torch.float32, device=out.device) if len(groups) > 1 else target
    for g, idx in enumerate(groups):
        xs = [inputs[i] for i in idx]
        ws = [float(weights[i]) for i in idx]
        pad = GROUP - len(xs)
        _blend_kernel[grid](
            target, scratch, base if base is not None else xs[0],
            *xs, *([xs[0]] * pad),
            *ws, *([0.0] * pad),
            float(lam), n,
            N_IN=len(xs), HAS_BASE=base is not None, FIRST=g == 0, LAST=g == len(groups) - 1,
            OUT_KIND=out_kind, BLOCK=block, **LAUNCH_OPTIONS,
        )
    return out

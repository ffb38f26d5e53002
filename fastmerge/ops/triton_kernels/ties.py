"""Triton element pass of the TIES-family merge (fastmerge/ops/ties.py documents the
arithmetic; this kernel follows it step for step so the bytes match the native kernel).

One program handles BLOCK elements of all K models: the inputs arrive as a tuple of pointers,
the per-model scalars in two small device tensors, and the sparsifier kinds as a constexpr
tuple so each model's selection compiles to just its own test. With consensus the deltas are
computed twice (once for the elected sign, once for the masked sum) instead of being kept for
all K models: recomputing is cheaper than registers or memory, and Philox is counter-based, so
the second draw equals the first. A MASKED model (della) reads its precomputed keep mask, passed
as a second tuple of pointers (other models pass their input as an unread placeholder).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LAUNCH_OPTIONS, elementwise_block, output_target, store_rounded

# Columns of the per-model parameter tensors.
_W, _SCALE, _DENSITY = 0, 1, 2
_T_HI, _CUT_HI, _T_LO, _CUT_LO, _KEY = 0, 1, 2, 3, 4


@triton.jit
def _in_top(bits, offs, t, cut):
    return (bits > t) | ((bits == t) & (offs < cut))


@triton.jit
def _kept_delta(x_ptr, keep_ptr, b, offs, mask, fparams, iparams, m: tl.constexpr, MODE: tl.constexpr):
    """Model m's sparsified, rescaled task-vector element (step 1 of the docstring)."""
    d = tl.load(x_ptr + offs, mask=mask, other=0).to(tl.float32) - b
    bits = d.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    if MODE == 1:
        keep = _in_top(bits, offs, tl.load(iparams + m * 5 + 0).to(tl.int32), tl.load(iparams + m * 5 + 1))
    elif MODE == 2:
        keep = _in_top(bits, offs, tl.load(iparams + m * 5 + 2).to(tl.int32), tl.load(iparams + m * 5 + 3))
        keep = keep & ~_in_top(bits, offs, tl.load(iparams + m * 5 + 0).to(tl.int32), tl.load(iparams + m * 5 + 1))
    elif MODE == 3:
        key = tl.load(iparams + m * 5 + 4).to(tl.uint64, bitcast=True)
        keep = tl.rand(key, offs) < tl.load(fparams + m * 3 + 2)
    elif MODE == 4:
        keep = tl.load(keep_ptr + offs, mask=mask, other=0) != 0
    else:
        keep = bits >= 0
    return tl.where(keep, d * tl.load(fparams + m * 3 + 1), 0.0)


@triton.jit
def _ties_kernel(out_ptr, base_ptr, xs, keeps, fparams, iparams, n, plain_div, lam,
                 MODES: tl.constexpr, K: tl.constexpr, CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr,
                 OUT_KIND: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    b = tl.load(base_ptr + offs, mask=mask, other=0).to(tl.float32)
    elect = tl.zeros([BLOCK], tl.float32)
    for m in tl.static_range(K):
        d = _kept_delta(xs[m], keeps[m], b, offs, mask, fparams, iparams, m, MODES[m])
        elect = tl.fma(tl.load(fparams + m * 3), d, elect)
    if CONSENSUS:
        positive = elect >= 0
        mixed = tl.zeros([BLOCK], tl.float32)
        div = tl.zeros([BLOCK], tl.float32)
        for m in tl.static_range(K):
            d = _kept_delta(xs[m], keeps[m], b, offs, mask, fparams, iparams, m, MODES[m])
            w = tl.zeros([BLOCK], tl.float32) + tl.load(fparams + m * 3)  # a block, so masks combine
            agrees = (d != 0) & (w != 0) & (((d > 0) == (w > 0)) == positive)
            mixed = tl.where(agrees, tl.fma(w, d, mixed), mixed)
            div = tl.where(agrees, div + w, div)
    else:
        mixed = elect
        div = tl.zeros([BLOCK], tl.float32) + plain_div
    if NORMALIZE:
        mixed = tl.div_rn(mixed, tl.where(div == 0, 1.0, div))
    store_rounded(out_ptr + offs, tl.fma(lam, mixed, b), mask, OUT_KIND)


def model_params(inputs, weights, scales, selectors, device):
    """What `_kept_delta` reads per model: (fparams, iparams, keep pointers). Keys go in as
    signed int64 (the same 64 bits) since the tensor has no uint64."""
    fparams = torch.tensor([[w, s, sel.density] for w, s, sel in zip(weights, scales, selectors)],
                           dtype=torch.float32, device=device)
    keys = [sel.key - (1 << 64) if sel.key >= 1 << 63 else sel.key for sel in selectors]
    iparams = torch.tensor([[s.t_hi, s.cut_hi, s.t_lo, s.cut_lo, key] for s, key in zip(selectors, keys)],
                           dtype=torch.int64, device=device)
    keeps = tuple(x if s.keep is None else s.keep.view(torch.uint8) for x, s in zip(inputs, selectors))
    return fparams, iparams, keeps


def ties_pass(base, inputs, weights, scales, selectors, consensus, normalize, lam, out_dtype):
    """Run the element pass; arguments as fastmerge.ops.ties._native_pass."""
    from ..ties import plain_divisor

    device = base.device
    fparams, iparams, keeps = model_params(inputs, weights, scales, selectors, device)
    out = torch.empty(base.shape, dtype=out_dtype, device=device)
    target, out_kind = output_target(out)
    n = base.numel()
    block = elementwise_block(n, device)
    _ties_kernel[(triton.cdiv(n, block),)](
        target, base, tuple(inputs), keeps, fparams, iparams, n, plain_divisor(weights), lam,
        MODES=tuple(s.mode for s in selectors), K=len(inputs), CONSENSUS=consensus, NORMALIZE=normalize,
        OUT_KIND=out_kind, BLOCK=block, **LAUNCH_OPTIONS)
    return out

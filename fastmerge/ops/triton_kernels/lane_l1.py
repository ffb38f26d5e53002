"""Triton lane sums behind DARE's L1 rescale (||d||_1 / ||kept||_1, fastmerge/ops/ties.py).

The order is csrc/dare.cpp's, so the bytes match the native kernel: lane l of L1_LANES adds
|d| for elements l, l + L, l + 2L, ... in index order, in fp64. Each program owns a block of
lanes and walks the rows in order, so every lane's sum is strictly sequential whatever the
launch; only the L1_LANES lane sums (2 x 512 KiB) leave the device, and the caller adds those in
lane order. The deltas and the keep test are `_kept_delta`'s, the TIES element pass's own code,
so the rescale sees exactly the elements the merge keeps.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from . import _common
from .ties import _kept_delta, model_params

KEEP_ALL = tl.constexpr(0)  # fastmerge.ops.ties.KEEP_ALL: `_kept_delta` keeps every element


@triton.jit
def _lane_l1_kernel(x_ptr, keep_ptr, base_ptr, fparams, iparams, all_out, kept_out, n,
                    LANES: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr):
    lanes = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    all_acc = tl.zeros([BLOCK], tl.float64)
    kept_acc = tl.zeros([BLOCK], tl.float64)
    # `start` takes n's type: int64 when n needs it, so offsets never overflow.
    for start in range(0, n, LANES):
        offs = start + lanes
        mask = offs < n
        b = tl.load(base_ptr + offs, mask=mask, other=0).to(tl.float32)
        # Elements past n read as 0 and add +0.0: the sums are unchanged.
        d = _kept_delta(x_ptr, keep_ptr, b, offs, mask, fparams, iparams, 0, KEEP_ALL)
        kept = _kept_delta(x_ptr, keep_ptr, b, offs, mask, fparams, iparams, 0, MODE)
        all_acc += tl.abs(d).to(tl.float64)
        kept_acc += tl.abs(kept).to(tl.float64)
    tl.store(all_out + lanes, all_acc)
    tl.store(kept_out + lanes, kept_acc)


def kept_l1_lanes(x: torch.Tensor, base: torch.Tensor, selector, lanes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-lane fp64 sums of |x - base| and of its kept part under `selector` (a
    fastmerge.ops.ties.Selector); both float64[lanes], for the caller to add in lane order."""
    device = x.device
    fparams, iparams, keeps = model_params([x], [1.0], [1.0], [selector], device)
    sums = torch.empty(2, lanes, dtype=torch.float64, device=device)
    n = x.numel()
    # On a GPU, 256 lanes per program gives enough programs to fill the SMs; the interpreter runs
    # programs one by one in Python, so there one program takes every lane.
    block = 256 if _common.sized_for_gpu(device) else lanes
    _lane_l1_kernel[(lanes // block,)](
        x, keeps[0], base, fparams, iparams, sums[0], sums[1], n,
        LANES=lanes, MODE=selector.mode, BLOCK=block, **_common.LAUNCH_OPTIONS)
    all_lanes, kept_lanes = sums.cpu().numpy()
    return all_lanes, kept_lanes

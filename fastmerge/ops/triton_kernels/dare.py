"""Triton DARE draws: u = tl.rand(key, flat index), the stream the fused TIES/DARE kernel
(triton_kernels/ties.py) draws from; used to check native and Triton masks agree bit for bit."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LAUNCH_OPTIONS, elementwise_block


@triton.jit
def _uniform_kernel(out_ptr, key, offset, n, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + idx, tl.rand(key, offset + idx), mask=idx < n)


def uniform(key: int, offset: int, n: int, device: torch.device) -> torch.Tensor:
    """fp32 draws for counters offset .. offset+n-1 (see fastmerge/ops/random.py)."""
    out = torch.empty(n, dtype=torch.float32, device=device)
    if n:
        block = elementwise_block(n, device)
        _uniform_kernel[(triton.cdiv(n, block),)](out, key, offset, n, BLOCK=block, **LAUNCH_OPTIONS)
    return out

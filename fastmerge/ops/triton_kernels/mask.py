"""Triton kernel for fastmerge.ops.apply_mask (same bytes as its reference)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LAUNCH_OPTIONS, elementwise_block, output_target, store_rounded


@triton.jit
def _apply_mask_kernel(x_ptr, mask_ptr, out_ptr, scale, n, PACKED: tl.constexpr, OUT_KIND: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    if PACKED:
        byte = tl.load(mask_ptr + offs // 8, mask=inside, other=0).to(tl.int32)
        keep = ((byte >> (offs % 8).to(tl.int32)) & 1) != 0
    else:
        keep = tl.load(mask_ptr + offs, mask=inside, other=0) != 0
    store_rounded(out_ptr + offs, tl.where(keep, x * scale, 0.0), inside, OUT_KIND)


def apply_mask_triton(x: torch.Tensor, mask: torch.Tensor, packed: bool, scale: float, out: torch.Tensor) -> torch.Tensor:
    """x, mask and out contiguous; a dense bool mask is read as its 0/1 bytes."""
    n = x.numel()
    if n == 0:
        return out
    target, out_kind = output_target(out)
    block = elementwise_block(n, x.device)
    mask_bytes = mask if packed else mask.view(torch.uint8)
    _apply_mask_kernel[(triton.cdiv(n, block),)](
        x, mask_bytes, target, scale, n, PACKED=packed, OUT_KIND=out_kind, BLOCK=block, **LAUNCH_OPTIONS)
    return out

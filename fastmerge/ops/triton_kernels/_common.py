"""Helpers shared by the Triton kernels: exact output rounding and launch sizes.

Why the bf16 rounding is done by hand: the contract (DESIGN.md "Arithmetic") is one
round-to-nearest-even into the output dtype, and Triton's interpreter (TRITON_INTERPRET=1, how the
tests run without a GPU) *truncates* fp32 -> bf16 casts. Rounding on the integer bits gives the
same bytes in the interpreter and on a GPU, and the same bytes as csrc/dtype.h `f32_to_bf16`.
fp16 casts already round to nearest-even in both, so fp16 and fp32 outputs store directly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...errors import KernelError

# Output kinds understood by `store_rounded` (a tl.constexpr in the kernels).
OUT_F32, OUT_F16, OUT_BF16_BITS = 0, 1, 2

# Options of every launch. Without them the GPU compiler may contract a product and a sum into
# one fused multiply-add (Triton's default up to 3.9), which rounds once where the contract
# (DESIGN.md "Arithmetic") rounds twice; every fused multiply-add the contract wants is an
# explicit tl.fma. csrc is built with -ffp-contract=off and nvcc with --fmad=false for the same
# reason. The interpreter ignores the option.
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


@triton.jit
def f32_to_bf16_bits(x):
    """Round fp32 to bf16 (nearest, ties to even) and return the 16 bits as int16.

    NaN keeps its sign and payload's top bits and is forced quiet, as in csrc/dtype.h."""
    u = x.to(tl.uint32, bitcast=True)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    quiet_nan = (u >> 16) | 0x40
    bits = tl.where((u & 0x7FFFFFFF) > 0x7F800000, quiet_nan, rounded)
    return bits.to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def store_rounded(ptr, x, mask, OUT_KIND: tl.constexpr):
    """Store fp32 values `x` rounded to nearest-even into `ptr` (see `output_target`)."""
    if OUT_KIND == 2:
        tl.store(ptr, f32_to_bf16_bits(x), mask=mask)
    else:
        tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)


def output_target(out: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The tensor a kernel should store into and its OUT_KIND: bf16 outputs are written as their
    int16 bit patterns (so no cast happens inside the kernel), fp32/fp16 directly."""
    if out.dtype == torch.bfloat16:
        return out.view(torch.int16), OUT_BF16_BITS
    if out.dtype == torch.float16:
        return out, OUT_F16
    if out.dtype == torch.float32:
        return out, OUT_F32
    raise KernelError(f"triton kernels write fp32, fp16 or bf16, not {out.dtype}")


def sized_for_gpu(device: torch.device) -> bool:
    """Whether launches on `device` are sized for a GPU. The interpreter (CPU tensors) runs
    programs one after another in Python, so there the fewer and larger the blocks the better,
    while a GPU wants modest blocks that keep every SM busy. Every launch-size choice goes
    through here, so a test can compile the GPU's launches ahead of time without a GPU."""
    return device.type == "cuda"


def elementwise_block(n: int, device: torch.device) -> int:
    """Elements per program for an element-wise kernel (see `sized_for_gpu`)."""
    if sized_for_gpu(device):
        return 1024
    return max(16, min(1 << 16, triton.next_power_of_2(max(n, 1))))

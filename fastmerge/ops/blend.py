"""Weighted N-way blend: out = sum_i w_i x_i (times lam), or b + lam * sum_i w_i (x_i - b).

The arithmetic contract (DESIGN.md "Arithmetic"): weights (and lam) are rounded to fp32 first;
fp32 accumulation from 0 in the given order, each step one fused multiply-add
(`acc = fma(w_i, x_i, acc)`, or `acc = fma(w_i, x_i - b, acc)` with a base), then
`out = acc * lam` (no base; no multiply when lam == 1) or `out = fma(lam, acc, b)` (with a base),
and one round-to-nearest-even into the output dtype. Every backend (reference, native, triton)
gives the same bytes for finite and infinite values; NaNs stay NaN, but their sign/payload bits
are not part of the contract (torch itself canonicalises NaN differently in different paths).

Inputs may be fp32, fp16, bf16 or fp8 (e4m3fn/e5m2, read-only) and may mix dtypes; outputs are
fp32, fp16 or bf16. Non-contiguous inputs are copied to contiguous memory first (a documented
copy, never a silent misread); `out=` must be contiguous since the kernels write it in place.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..dtypes import FLOAT_OUTPUT_DTYPES, native_code
from ..errors import KernelError
from ._checks import check_alike, check_numbers, labelled
from ._dispatch import resolve_backend
from ._fma import fma_f32

SUPPORTED_BACKENDS = ("reference", "native", "triton")


def blend_reference(
    inputs: Sequence[torch.Tensor],
    weights: Sequence[float],
    base: torch.Tensor | None = None,
    lam: float = 1.0,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Plain torch oracle: each step an exact fp32 fma (`fma_f32`), one rounding at the end."""
    out_dtype = out_dtype or inputs[0].dtype
    acc = torch.zeros(inputs[0].shape, dtype=torch.float32, device=inputs[0].device)
    b32 = base.to(torch.float32) if base is not None else None
    for w, x in zip(weights, inputs):
        term = x.to(torch.float32) if b32 is None else x.to(torch.float32) - b32
        acc = fma_f32(torch.tensor(w, dtype=torch.float32), term, acc)
    if b32 is None:
        out = acc if lam == 1.0 else acc * torch.tensor(lam, dtype=torch.float32)
    else:
        out = fma_f32(torch.tensor(lam, dtype=torch.float32), acc, b32)
    return out.to(out_dtype)


def blend(
    inputs: Sequence[torch.Tensor],
    weights: Sequence[float],
    base: torch.Tensor | None = None,
    lam: float = 1.0,
    out_dtype: torch.dtype | None = None,
    backend: str | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Blend same-shape `inputs` with `weights` (see the module docstring for the exact arithmetic).

    `out_dtype` defaults to `out.dtype` when `out` is given, else to the first input's dtype.
    `out` (optional, contiguous, right shape) is written in place and returned, which lets the
    engine blend straight into a slice of an output buffer. Raises KernelError on mismatched
    lengths, shapes, dtypes or devices.
    """
    inputs = list(inputs)
    weights = _fp32_weights(inputs, weights)
    check_numbers("blend", "lam", [lam])
    out_dtype = _check_tensors(inputs, base, out_dtype, out)
    name = resolve_backend("blend", [*inputs, base, out], SUPPORTED_BACKENDS, backend)
    if name == "reference":
        result = blend_reference(inputs, weights, base=base, lam=lam, out_dtype=out_dtype)
        return result if out is None else out.copy_(result)
    inputs = [x.contiguous() for x in inputs]
    base = base.contiguous() if base is not None else None
    if out is None:
        out = torch.empty(inputs[0].shape, dtype=out_dtype, device=inputs[0].device)
    lam32 = _fp32(lam)
    if name == "native":
        return _blend_native(inputs, weights, base, lam32, out)
    from .triton_kernels.blend import blend_triton

    return blend_triton(inputs, weights, base, lam32, out)


def _blend_native(inputs, weights, base, lam, out):
    from .. import _native

    _native.blend(
        [x.data_ptr() for x in inputs],
        [native_code(x.dtype) for x in inputs],
        weights,
        base.data_ptr() if base is not None else 0,
        native_code(base.dtype) if base is not None else 0,
        lam,
        out.data_ptr(),
        native_code(out.dtype),
        out.numel(),
    )
    return out


def _fp32(value: float) -> float:
    """`value` rounded to the nearest fp32, as a Python float (so every backend sees it alike)."""
    return torch.tensor(float(value), dtype=torch.float32).item()


def _fp32_weights(inputs: list, weights: Sequence[float]) -> list[float]:
    if len(inputs) == 0:
        raise KernelError("blend needs at least one input tensor")
    weights = list(weights)
    if len(weights) != len(inputs):
        raise KernelError(f"blend got {len(inputs)} inputs but {len(weights)} weights; give one weight per input")
    check_numbers("blend", "weights", weights)
    return [_fp32(w) for w in weights]


def _check_tensors(inputs, base, out_dtype, out) -> torch.dtype:
    """Validate shapes, dtypes and devices; return the output dtype."""
    check_alike("blend", labelled("inputs", inputs, base))
    shape, device = inputs[0].shape, inputs[0].device
    if out is not None:
        if out_dtype is not None and out.dtype != out_dtype:
            raise KernelError(f"blend: out has dtype {out.dtype} but out_dtype={out_dtype}")
        if out.shape != shape or out.device != device:
            raise KernelError(
                f"blend: out is {tuple(out.shape)} on {out.device}; it must be {tuple(shape)} on {device}"
            )
        if not out.is_contiguous():
            raise KernelError("blend: out must be contiguous (the kernels write it in place)")
        out_dtype = out.dtype
    out_dtype = out_dtype or inputs[0].dtype
    if out_dtype not in FLOAT_OUTPUT_DTYPES:
        raise KernelError(f"blend: out_dtype {out_dtype} is not writable; use float32, float16 or bfloat16")
    return out_dtype

"""Element masks: apply a keep-mask with a scale, pack/unpack bitmasks, 2:4 semi-structured masks.

`apply_mask(x, mask, scale)` computes, per element, `x * scale` (one fp32 multiply, rounded to
nearest-even into x's dtype) where the mask keeps it and +0 elsewhere. Every backend gives the
reference's bytes.

Mask forms
- dense: a torch.bool tensor of x's shape;
- packed bitmask (also the on-disk mask format): a 1-D torch.uint8 tensor of ceil(numel / 8)
  bytes over x's flat (row-major) index i: element i is bit (i % 8) of byte (i // 8), bit 0 being
  the least significant ("little-endian" bit order; numpy's `packbits(..., bitorder="little")`).
  Padding bits in the last byte are written as 0 and ignored on reading;
- 2:4 semi-structured: either form, with `semi_structured=True`, checked to keep exactly 2 of
  every 4 consecutive elements along the last dimension (which must be a multiple of 4).
  `semi_structured_mask(scores)` builds such a mask.
"""

from __future__ import annotations

import torch

from ..dtypes import FLOAT_OUTPUT_DTYPES, native_code
from ..errors import KernelError
from ._dispatch import resolve_backend

SUPPORTED_BACKENDS = ("reference", "native", "triton")
PACKING_BACKENDS = ("reference", "native")


def packed_size(numel: int) -> int:
    """Bytes of a packed bitmask over `numel` elements."""
    return (numel + 7) // 8


def apply_mask(
    x: torch.Tensor,
    mask: torch.Tensor,
    scale: float = 1.0,
    out: torch.Tensor | None = None,
    inplace: bool = False,
    backend: str | None = None,
    semi_structured: bool = False,
) -> torch.Tensor:
    """Return `x * scale` where `mask` keeps, 0 elsewhere, in x's dtype (see the module docstring).

    `inplace=True` writes into x (which must then be contiguous); `out=` writes into a given
    contiguous tensor of x's shape and dtype. Non-contiguous x is copied first otherwise.
    """
    packed = _check_mask(x, mask, semi_structured)
    if inplace and out is not None:
        raise KernelError("apply_mask: give either out= or inplace=True, not both")
    if inplace:
        out = x
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous() or out.device != x.device):
        raise KernelError(
            f"apply_mask: out must be a contiguous {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}; "
            f"got {out.dtype} {tuple(out.shape)} on {out.device} (contiguous={out.is_contiguous()})"
        )
    scale32 = torch.tensor(float(scale), dtype=torch.float32).item()
    name = resolve_backend("apply_mask", [x, mask, out], SUPPORTED_BACKENDS, backend)
    if name == "reference":
        result = apply_mask_reference(x, mask, scale32)
        return result if out is None else out.copy_(result)
    src, m = x.contiguous(), mask.contiguous()
    out = out if out is not None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if name == "native":
        from .. import _native

        _native.apply_mask(src.data_ptr(), native_code(x.dtype), m.data_ptr(), packed, scale32, out.data_ptr(), x.numel())
        return out
    from .triton_kernels.mask import apply_mask_triton

    return apply_mask_triton(src, m, packed, scale32, out)


def apply_mask_reference(x: torch.Tensor, mask: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Plain torch oracle."""
    keep = unpack_mask_reference(mask, x.shape) if mask.dtype == torch.uint8 else mask
    scaled = x.to(torch.float32) * torch.tensor(scale, dtype=torch.float32)
    return torch.where(keep, scaled, torch.zeros((), dtype=torch.float32, device=x.device)).to(x.dtype)


def pack_mask(mask: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Pack a bool tensor (any shape) into the little-endian bitmask described above."""
    if mask.dtype != torch.bool:
        raise KernelError(f"pack_mask expects a torch.bool tensor, got {mask.dtype}")
    name = resolve_backend("pack_mask", [mask], PACKING_BACKENDS, backend)
    if name == "reference":
        return pack_mask_reference(mask)
    from .. import _native

    dense = mask.contiguous()
    packed = torch.empty(packed_size(mask.numel()), dtype=torch.uint8)
    _native.pack_mask(dense.data_ptr(), dense.numel(), packed.data_ptr())
    return packed


def unpack_mask(packed: torch.Tensor, shape, backend: str | None = None) -> torch.Tensor:
    """Unpack a bitmask into a bool tensor of `shape`."""
    shape = torch.Size(shape)
    _check_packed(packed, shape.numel(), f"shape {tuple(shape)}")
    name = resolve_backend("unpack_mask", [packed], PACKING_BACKENDS, backend)
    if name == "reference":
        return unpack_mask_reference(packed, shape)
    from .. import _native

    src = packed.contiguous()
    dense = torch.empty(shape, dtype=torch.bool)
    _native.unpack_mask(src.data_ptr(), shape.numel(), dense.data_ptr())
    return dense


def pack_mask_reference(mask: torch.Tensor) -> torch.Tensor:
    flat = mask.reshape(-1).to(torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, (-flat.numel()) % 8)).reshape(-1, 8)
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8, device=mask.device)
    return (flat * weights).sum(dim=1).to(torch.uint8)


def unpack_mask_reference(packed: torch.Tensor, shape) -> torch.Tensor:
    shape = torch.Size(shape)
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.reshape(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[: shape.numel()].bool().reshape(shape)


def semi_structured_mask(scores: torch.Tensor) -> torch.Tensor:
    """A 2:4 bool mask over `scores`: in each group of 4 consecutive elements along the last
    dimension keep the 2 largest scores; on ties the lower index wins (a stable sort)."""
    if scores.dim() == 0 or scores.shape[-1] % 4 != 0:
        raise KernelError(f"semi_structured_mask: the last dimension of shape {tuple(scores.shape)} must be a multiple of 4")
    if not scores.is_floating_point() or scores.isnan().any():
        raise KernelError("semi_structured_mask: scores must be a floating tensor without NaN")
    groups = scores.reshape(-1, 4)
    order = torch.sort(groups, dim=1, descending=True, stable=True).indices
    keep = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device)
    keep.scatter_(1, order[:, :2], True)
    return keep.reshape(scores.shape)


def _check_packed(packed: torch.Tensor, numel: int, what: str) -> None:
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_size(numel):
        raise KernelError(
            f"packed mask has dtype {packed.dtype} and shape {tuple(packed.shape)}; for {what} "
            f"({numel} elements) it must be uint8 of shape ({packed_size(numel)},)"
        )


def _check_mask(x: torch.Tensor, mask: torch.Tensor, semi_structured: bool) -> bool:
    """Validate x and mask; return True for a packed mask, False for a dense one."""
    if x.dtype not in FLOAT_OUTPUT_DTYPES:
        raise KernelError(f"apply_mask: x has dtype {x.dtype}; it must be float32, float16 or bfloat16")
    if mask.device != x.device:
        raise KernelError(f"apply_mask: mask is on {mask.device} but x is on {x.device}")
    if mask.dtype == torch.bool:
        if mask.shape != x.shape:
            raise KernelError(f"apply_mask: dense mask has shape {tuple(mask.shape)} but x has shape {tuple(x.shape)}")
        packed = False
    elif mask.dtype == torch.uint8:
        _check_packed(mask, x.numel(), f"x of shape {tuple(x.shape)}")
        packed = True
    else:
        raise KernelError(f"apply_mask: mask must be torch.bool (dense) or torch.uint8 (packed), not {mask.dtype}")
    if semi_structured:
        _check_two_of_four(x.shape, unpack_mask_reference(mask, x.shape) if packed else mask)
    return packed


def _check_two_of_four(shape: torch.Size, keep: torch.Tensor) -> None:
    if len(shape) == 0 or shape[-1] % 4 != 0:
        raise KernelError(f"apply_mask: a 2:4 mask needs the last dimension of shape {tuple(shape)} to be a multiple of 4")
    counts = keep.reshape(-1, 4).sum(dim=1)
    bad = (counts != 2).nonzero()
    if len(bad):
        g = int(bad[0])
        raise KernelError(
            f"apply_mask: mask is not 2:4 semi-structured: group {g} (flat elements {4 * g}..{4 * g + 3}) "
            f"keeps {int(counts[g])} of 4; exactly 2 are required"
        )

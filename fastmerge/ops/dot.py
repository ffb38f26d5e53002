"""Gram matrix of K vectors, or of their task vectors x_i - base: G[i, j, r] = <v_i, v_j> over
fibre r, in fp64. The inner products behind slerp, nuslerp, multislerp, karcher and model_stock.

Vectors are whole tensors (`dim=None`, R = 1) or the fibres of a tensor along one dimension
(`dim=-1`: every row of a matrix; `dim=0`: every column; fibre order as `movedim(dim, -1)`
flattens them). Task vectors are formed in fp32 (`x.float() - base.float()`, as the blend
kernel forms them); every product of two fp32 values is exact in fp64, so backends differ only
in the order of their fp64 additions:

- native (CPU default): fixed-size blocks with fixed-lane partial sums, block sums added in
  block order (csrc/dot.cpp), so the result does not depend on the thread count; no copy of an
  input is made, each input is read once.
- reference (any device; the oracle): torch matmuls over blocks of at most `BLOCK_ELEMENTS`
  elements per input, so its fp32/fp64 scratch is bounded too.

Documented tolerance between backends: |G - G_ref| <= GRAM_TOLERANCE * |v_i| |v_j| elementwise.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..dtypes import native_code
from ..errors import KernelError
from ._checks import check_alike, labelled
from ._dispatch import resolve_backend

SUPPORTED_BACKENDS = ("reference", "native")
GRAM_TOLERANCE = 1e-12
# Elements per input in one reference block: bounds its fp64 scratch to K x 8 MiB.
BLOCK_ELEMENTS = 1 << 20


def gram(
    vectors: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    dim: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """fp64 [K, K, R] inner products of the vectors (task vectors with `base`), see the module
    docstring. Raises KernelError on mismatched shapes/devices, non-float inputs or a bad dim."""
    vectors = list(vectors)
    outer, length, inner = _layout(vectors, base, dim)
    name = resolve_backend("gram", [*vectors, base], SUPPORTED_BACKENDS, backend)
    if name == "native":
        return _gram_native(vectors, base, outer, length, inner)
    return _gram_reference(vectors, base, outer, length, inner)


def _layout(vectors: list[torch.Tensor], base: torch.Tensor | None, dim: int | None) -> tuple[int, int, int]:
    """Validate the inputs; return (outer, length, inner): the tensor viewed as
    [outer, length, inner] with the fibres running along `length`."""
    if not vectors:
        raise KernelError("gram needs at least one vector")
    check_alike("gram", labelled("vectors", vectors, base))
    shape = vectors[0].shape
    if dim is None or len(shape) <= 1:
        return 1, math.prod(shape), 1
    if not -len(shape) <= dim < len(shape):
        raise KernelError(f"gram: dim={dim} is out of range for a tensor of shape {tuple(shape)}")
    dim %= len(shape)
    return math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1 :])


def _gram_native(vectors, base, outer: int, length: int, inner: int) -> torch.Tensor:
    from .. import _native

    if vectors[0].is_cuda:
        raise KernelError("gram: the native backend runs on CPU tensors; use backend='reference' on CUDA")
    vectors = [v.contiguous() for v in vectors]
    base = base.contiguous() if base is not None else None
    count = len(vectors)
    result = torch.empty((count, count, outer * inner), dtype=torch.float64)
    _native.gram(
        [v.data_ptr() for v in vectors],
        [native_code(v.dtype) for v in vectors],
        base.data_ptr() if base is not None else 0,
        native_code(base.dtype) if base is not None else 0,
        outer,
        length,
        inner,
        result.data_ptr(),
    )
    return result


def _gram_reference(vectors, base, outer: int, length: int, inner: int) -> torch.Tensor:
    """Blocks of [outer rows, length slice, inner columns] with at most BLOCK_ELEMENTS elements,
    task vectors formed per block; each block's products summed with one batched matmul."""
    count = len(vectors)
    views = [v.reshape(outer, length, inner) for v in vectors]
    base_view = base.reshape(outer, length, inner) if base is not None else None
    result = torch.zeros((count, count, outer, inner), dtype=torch.float64, device=vectors[0].device)
    per_outer = length * inner
    outer_step = max(1, BLOCK_ELEMENTS // max(1, per_outer))
    length_step = max(1, BLOCK_ELEMENTS // max(1, inner))
    for o0 in range(0, outer, outer_step):
        o1 = min(outer, o0 + outer_step)
        for d0 in range(0, length, length_step):
            d1 = min(length, d0 + length_step)
            block = torch.stack([_task_block(v, base_view, o0, o1, d0, d1) for v in views])  # [K, o, d, c]
            # [o, c, K, d] @ [o, c, d, K] -> [o, c, K, K]
            fibred = block.permute(1, 3, 0, 2)
            products = fibred @ fibred.transpose(-1, -2)
            result[:, :, o0:o1] += products.permute(2, 3, 0, 1)
    return result.reshape(count, count, outer * inner)


def _task_block(view: torch.Tensor, base_view: torch.Tensor | None, o0: int, o1: int, d0: int, d1: int) -> torch.Tensor:
    block = view[o0:o1, d0:d1].float()
    if base_view is not None:
        block = block - base_view[o0:o1, d0:d1].float()
    return block.double()

"""Inner products and coefficient mixes shared by the spherical and geometric methods.

Every method here (slerp, nuslerp, multislerp, karcher, model_stock) produces its output as a
linear combination of its inputs whose coefficients depend only on inner products between them.
So each one is two passes over the data: `gram` (all pairwise dot products, fp64 accumulation
as DESIGN.md asks for whole-tensor dot products, `ops.dot.gram`: no copy of an input is ever
made), then a tiny fp64 computation on K x K numbers, then `mix` (one fused
weighted sum with the blend kernel's arithmetic).

Vectors can be whole tensors (`dim=None`) or the fibres of a tensor along one dimension
(`dim=-1`: every row of a matrix; `dim=0`: every column), for the per-row variants
(nuslerp without flattening, model_stock's filter_wise). Task vectors x - base are formed in
fp32, exactly as the blend kernel forms them, so coefficients and the final mix see the same
numbers.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .. import ops
from ..ops import dot
from ..ops._dispatch import helper_backend

def fibres(x: torch.Tensor, dim: int | None) -> torch.Tensor:
    """`x` as a [R, D] matrix whose rows are the vectors: one row (the flattened tensor) when
    dim is None, else the fibres along `dim`. Tensors of at most one dimension are one vector."""
    if dim is None or x.ndim <= 1:
        return x.reshape(1, -1)
    moved = x.movedim(dim, -1)
    return moved.reshape(-1, moved.shape[-1])


def unfibre(rows: torch.Tensor, like: torch.Tensor, dim: int | None) -> torch.Tensor:
    """Inverse of `fibres`: put [R, D] rows back into the shape of `like`."""
    if dim is None or like.ndim <= 1:
        return rows.reshape(like.shape)
    return rows.reshape(like.movedim(dim, -1).shape).movedim(-1, dim)


def gram(
    vectors: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    dim: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """fp64 inner products G[i, j, r] = <v_i, v_j> of fibre r, where v_i is vectors[i] (or the
    task vector vectors[i] - base). Shape [K, K, R]; R = 1 for whole tensors.

    `ops.dot.gram` does the work (fused native kernel on CPU: inputs read once, no tensor-sized
    copies, fixed summation order). `backend` is the run's backend: one gram has no kernel for
    (triton, cuda) falls back to gram's own default for the device.
    """
    requested = helper_backend(vectors[0].device, dot.SUPPORTED_BACKENDS, backend)
    return dot.gram(vectors, base=base, dim=dim, backend=requested)


def norms(g: torch.Tensor) -> torch.Tensor:
    """The vectors' fp64 norms [K, R] from their Gram matrix (clamped: rounding can make a
    zero vector's square a tiny negative)."""
    return torch.diagonal(g, dim1=0, dim2=1).T.clamp(min=0).sqrt()


def slerp_coefficients(cos: torch.Tensor, t: float, linear: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients (c0, c1) of v0 and v1 in the spherical interpolation at fraction t:
    sin((1-t) theta) / sin(theta) and sin(t theta) / sin(theta), theta = acos(cos); where
    `linear` is set (nearly parallel vectors, sin(theta) ~ 0) the linear 1 - t and t instead."""
    theta = torch.acos(torch.where(linear, torch.zeros_like(cos), cos))
    sin_theta = torch.where(linear, torch.ones_like(theta), torch.sin(theta))
    c0 = torch.where(linear, torch.full_like(cos, 1 - t), torch.sin((1 - t) * theta) / sin_theta)
    c1 = torch.where(linear, torch.full_like(cos, t), torch.sin(t * theta) / sin_theta)
    return c0, c1


def mix(
    inputs: Sequence[torch.Tensor],
    coefficients: torch.Tensor,
    task,
    base: torch.Tensor | None = None,
    dim: int | None = None,
) -> torch.Tensor:
    """sum_i c_i x_i, or base + sum_i c_i (x_i - base), in `task.out_dtype`.

    `coefficients` is [K] or [K, R] (one per fibre, see `fibres`). One coefficient per input is
    the fused blend kernel (any backend). Per-fibre coefficients use the same arithmetic in
    torch: fp32 accumulation from 0, each step an fp32 fma (an fp64 step rounded once), then
    fma(1, acc, base); so a per-fibre mix of identical coefficients gives the blend's bytes.
    """
    coefficients = coefficients.reshape(len(inputs), -1)
    if coefficients.shape[1] == 1:
        weights = [float(c) for c in coefficients[:, 0]]
        return ops.blend(inputs, weights, base=base, out_dtype=task.out_dtype, backend=task.backend)
    c32 = coefficients.to(device=inputs[0].device, dtype=torch.float32).double().unsqueeze(-1)
    b32 = fibres(base, dim).float() if base is not None else None
    acc = torch.zeros(fibres(inputs[0], dim).shape, dtype=torch.float32, device=inputs[0].device)
    for c, x in zip(c32, inputs):
        term = fibres(x, dim).float()
        if b32 is not None:
            term = term - b32
        acc = (c * term.double() + acc.double()).float()
    if b32 is not None:
        acc = (acc.double() + b32.double()).float()
    return unfibre(acc, inputs[0], dim).to(task.out_dtype)


"""RBF (Gaussian) similarity between two sets of vectors, per layer: RECALL's similarity kernel.

    K[l, i, j] = exp(-D[l, i, j] / (2 sigma_l^2)),
    D[l, i, j] = ||X[l, i]||^2 + ||Y[l, j]||^2 - 2 X[l, i] . Y[l, j]   (clamped at 0)

X is [n, d] or [L, n, d], Y is [m, d] or [L, m, d] (a leading layer dimension batches
independent problems). Norms and dot products are computed in fp64 in every backend, so the
cancellation in the expanded form costs nothing visible at fp32.

Median heuristic (sigma=None): per layer, sigma_l = sqrt(median(D_l) / 2), where the median is
the lower median (torch.median) of the non-zero entries of D_l, i.e. sigma_l^2 = median / 2 and
K = exp(-D / median). A layer whose distances are all zero gets sigma_l = 1 (K is 1 anyway).
An explicit sigma may be a positive float or a per-layer tensor of L positive values.

Backends compute D in a different summation order (native: fixed-order fp64 FMA loop; triton:
tiled fp64; reference: fp64 matmul), so results are not byte-identical across backends. The
documented tolerance: |D - D_ref| <= 1e-12 * (||x||^2 + ||y||^2) per element, which keeps the
fp32 K within 1e-6 (absolute) of the reference. The median, sigma and exp are shared code.
"""

from __future__ import annotations

import torch

from ..errors import KernelError
from ._dispatch import resolve_backend

SUPPORTED_BACKENDS = ("reference", "native", "triton")
D_TOLERANCE = 1e-12  # relative to ||x||^2 + ||y||^2, see the module docstring


def rbf_similarity(
    X: torch.Tensor,
    Y: torch.Tensor,
    sigma: float | torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (K, sigma): K fp32 of shape [.., n, m]; sigma fp64, shape [L] (or 0-d for 2-D input)."""
    batched = _check_inputs(X, Y)
    Xb, Yb = (X, Y) if batched else (X.unsqueeze(0), Y.unsqueeze(0))
    name = resolve_backend("rbf_similarity", [X, Y], SUPPORTED_BACKENDS, backend)
    D = squared_distances(Xb, Yb, name)
    sigmas = _sigmas(D, sigma)
    K = torch.exp(-D / (2.0 * sigmas[:, None, None] ** 2)).to(torch.float32)
    return (K, sigmas) if batched else (K[0], sigmas[0])


def squared_distances(X: torch.Tensor, Y: torch.Tensor, backend: str = "reference") -> torch.Tensor:
    """fp64 D [L, n, m] for X [L, n, d], Y [L, m, d] with the given backend (already resolved)."""
    Xd, Yd = X.to(torch.float64).contiguous(), Y.to(torch.float64).contiguous()
    if backend == "reference":
        xx = (Xd * Xd).sum(-1)[:, :, None]
        yy = (Yd * Yd).sum(-1)[:, None, :]
        return (xx + yy - 2.0 * Xd @ Yd.transpose(1, 2)).clamp_min(0.0)
    L, n, d = Xd.shape
    m = Yd.shape[1]
    D = torch.empty((L, n, m), dtype=torch.float64, device=X.device)
    if backend == "native":
        from .. import _native

        _native.rbf_sq_distances(Xd.data_ptr(), Yd.data_ptr(), L, n, m, d, D.data_ptr())
        return D
    from .triton_kernels.rbf import sq_distances_triton

    return sq_distances_triton(Xd, Yd, D)


def median_sigma(D: torch.Tensor) -> torch.Tensor:
    """Per-layer median-heuristic sigma (see the module docstring) for fp64 D [L, n, m]."""
    sigmas = torch.ones(D.shape[0], dtype=torch.float64, device=D.device)
    for layer, d in enumerate(D.reshape(D.shape[0], -1)):
        nonzero = d[d > 0]
        if nonzero.numel():
            sigmas[layer] = torch.sqrt(nonzero.median() / 2.0)
    return sigmas


def _sigmas(D: torch.Tensor, sigma) -> torch.Tensor:
    if sigma is None:
        return median_sigma(D)
    L = D.shape[0]
    s = torch.as_tensor(sigma, dtype=torch.float64).to(D.device).reshape(-1)
    if s.numel() == 1:
        s = s.expand(L)
    if s.numel() != L:
        raise KernelError(f"rbf_similarity: sigma has {s.numel()} values but there are {L} layers; give one per layer or a float")
    if not bool((s > 0).all()) or not bool(torch.isfinite(s).all()):
        raise KernelError(f"rbf_similarity: sigma must be positive and finite, got {s.tolist()}")
    return s.clone()


def _check_inputs(X: torch.Tensor, Y: torch.Tensor) -> bool:
    """Validate shapes; return True for batched [L, n, d] inputs."""
    if X.dim() not in (2, 3) or X.dim() != Y.dim():
        raise KernelError(
            f"rbf_similarity: X {tuple(X.shape)} and Y {tuple(Y.shape)} must both be [n, d] / [m, d] or [L, n, d] / [L, m, d]"
        )
    if X.shape[-1] != Y.shape[-1] or X.shape[:-2] != Y.shape[:-2]:
        raise KernelError(
            f"rbf_similarity: X {tuple(X.shape)} and Y {tuple(Y.shape)} must agree on the layer count and feature size"
        )
    if not (X.is_floating_point() and Y.is_floating_point()):
        raise KernelError(f"rbf_similarity: X and Y must be floating tensors, got {X.dtype} and {Y.dtype}")
    if X.device != Y.device:
        raise KernelError(f"rbf_similarity: X is on {X.device} but Y is on {Y.device}")
    return X.dim() == 3
